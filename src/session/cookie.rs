//! The only place tokengate's `Set-Cookie`s are built: names, attributes, and the splitting of a
//! large sealed session across several cookies (browsers cap one cookie at about 4 KB).
//!
//! Rules (interface.md): HttpOnly always; SameSite=Strict for the session, Lax for the login
//! transaction (it must survive the top-level redirect back from the IdP); Path=/; `Secure` and the
//! `__Host-` prefix whenever `public_url` is https.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::FromRequestParts;
use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue};
use tower_cookies::cookie::SameSite;
use tower_cookies::{Cookie, Cookies};

/// Base name of the session cookie (before any `__Host-` prefix).
pub const SESSION: &str = "tg_session";
/// Base name prefix of login-transaction cookies: `tg_tx_<state>`.
pub const TX: &str = "tg_tx_";
/// Largest value put in one cookie; larger sessions are split into `name.0`, `name.1`, ...
pub const CHUNK: usize = 3800;
/// At most this many chunks are written or read (about 30 KB).
pub const MAX_CHUNKS: usize = 8;

/// Names and attributes of tokengate's cookies for one deployment.
#[derive(Debug, Clone)]
pub struct CookieRules {
    secure: bool,
    session_name: String,
    tx_prefix: String,
}

impl CookieRules {
    pub fn new(https: bool) -> Self {
        let p = if https { "__Host-" } else { "" };
        Self {
            secure: https,
            session_name: format!("{p}{SESSION}"),
            tx_prefix: format!("{p}{TX}"),
        }
    }

    pub fn session_name(&self) -> &str {
        &self.session_name
    }

    pub fn tx_name(&self, state: &str) -> String {
        format!("{}{}", self.tx_prefix, state)
    }

    pub fn tx_prefix(&self) -> &str {
        &self.tx_prefix
    }

    /// True for every cookie name tokengate sets (session, its chunks, login transactions).
    /// Used to keep our cookies away from upstream APIs, in both directions.
    pub fn is_ours(&self, name: &str) -> bool {
        name == self.session_name
            || name.starts_with(&self.tx_prefix)
            || name
                .strip_prefix(&self.session_name)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|n| n.parse::<usize>().is_ok())
    }

    fn build(
        &self,
        name: String,
        value: String,
        same_site: SameSite,
        max_age: Duration,
    ) -> Cookie<'static> {
        let mut c = Cookie::new(name, value);
        c.set_http_only(true);
        c.set_secure(self.secure);
        c.set_same_site(same_site);
        c.set_path("/");
        c.set_max_age(tower_cookies::cookie::time::Duration::seconds(
            i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
        ));
        c
    }

    fn removal(&self, name: String, same_site: SameSite) -> Cookie<'static> {
        let mut c = self.build(name, String::new(), same_site, Duration::ZERO);
        c.set_expires(tower_cookies::cookie::time::OffsetDateTime::UNIX_EPOCH);
        c
    }

    // ---- login transactions ----

    pub fn set_tx(&self, cookies: &Cookies, state: &str, sealed: String, ttl: Duration) {
        cookies.add(self.build(self.tx_name(state), sealed, SameSite::Lax, ttl));
    }

    pub fn clear_tx(&self, cookies: &Cookies, name: &str) {
        cookies.add(self.removal(name.to_string(), SameSite::Lax));
    }

    /// Names of the login-transaction cookies the browser sent.
    pub fn tx_names(&self, cookies: &Cookies) -> Vec<String> {
        cookies
            .list()
            .into_iter()
            .map(|c| c.name().to_string())
            .filter(|n| n.starts_with(&self.tx_prefix))
            .collect()
    }

    // ---- the session ----

    /// The sealed session value the browser sent, reassembled from its chunks. As bytes: it is
    /// kilobytes long and only ever compared and base64-decoded (which refuses anything but its
    /// alphabet), so it is not UTF-8-checked on every request.
    pub fn read_session<'a>(&self, cookies: &'a RequestCookies) -> Option<Cow<'a, [u8]>> {
        if let Some(v) = cookies.sent_bytes(&self.session_name) {
            if !v.is_empty() {
                return Some(Cow::Borrowed(v));
            }
        }
        let mut out = Vec::new();
        for i in 0..MAX_CHUNKS {
            match cookies.sent_bytes(&format!("{}.{i}", self.session_name)) {
                Some(v) if !v.is_empty() => out.extend_from_slice(v),
                _ => break,
            }
        }
        (!out.is_empty()).then_some(Cow::Owned(out))
    }

    /// True when the browser sent any session cookie or chunk.
    pub fn has_session_cookie(&self, cookies: &RequestCookies) -> bool {
        cookies.pairs().any(|(n, _)| {
            n == self.session_name || (self.is_ours(n) && !n.starts_with(&self.tx_prefix))
        })
    }

    /// Writes a sealed session, split when large; stale chunks are removed. Returns false when the
    /// value does not fit in [`MAX_CHUNKS`] cookies.
    pub fn write_session(&self, cookies: &RequestCookies, sealed: &str, max_age: Duration) -> bool {
        let present = self.session_names(cookies);
        let mut written: Vec<String> = Vec::new();
        if sealed.len() <= CHUNK {
            written.push(self.session_name.clone());
            cookies.add(self.build(
                self.session_name.clone(),
                sealed.to_string(),
                SameSite::Strict,
                max_age,
            ));
        } else {
            // base64url is ASCII, so byte chunks are char boundaries.
            let chunks: Vec<&str> = sealed
                .as_bytes()
                .chunks(CHUNK)
                .map(|b| std::str::from_utf8(b).unwrap_or_default())
                .collect();
            if chunks.len() > MAX_CHUNKS {
                return false;
            }
            for (i, part) in chunks.iter().enumerate() {
                let name = format!("{}.{i}", self.session_name);
                written.push(name.clone());
                cookies.add(self.build(name, part.to_string(), SameSite::Strict, max_age));
            }
        }
        for stale in present.into_iter().filter(|n| !written.contains(n)) {
            cookies.add(self.removal(stale, SameSite::Strict));
        }
        true
    }

    /// The session cookie and chunk names the browser sent or this request wrote, once each.
    fn session_names(&self, cookies: &RequestCookies) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let sent = cookies.pairs().map(|(n, _)| n.to_string());
        for n in sent.chain(cookies.jar_names()) {
            if self.is_ours(&n) && !n.starts_with(&self.tx_prefix) && !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }

    /// Clears the session cookie and every chunk the browser sent (or might hold).
    pub fn clear_session(&self, cookies: &RequestCookies) {
        let mut names = self.session_names(cookies);
        if !names.contains(&self.session_name) {
            names.push(self.session_name.clone());
        }
        for n in names {
            cookies.add(self.removal(n, SameSite::Strict));
        }
    }

    /// Clears every tokengate cookie the browser sent: session, chunks, login transactions.
    pub fn clear_all(&self, cookies: &RequestCookies) {
        self.clear_session(cookies);
        for n in self.tx_names(cookies) {
            self.clear_tx(cookies, &n);
        }
    }
}

/// The request's cookies: read as the browser sent them (the `Cookie` header values), written
/// through tower-cookies' jar, which turns changes into `Set-Cookie`s. Reading the session
/// straight from the header spares every API call the jar's parse (a copy and a
/// percent-decoding pass over every cookie). Like the jar, the last of several cookies of one
/// name counts; unlike it, nothing is percent-decoded: tokengate's names and values are plain
/// (base64url), so an encoded one is not ours.
///
/// A request through the router gets its jar from tower-cookies' manager, which adds the
/// `Set-Cookie`s to the answer. An API call skips the manager ([`Self::standalone`]): its jar is
/// made on the first write (few calls write: the idle touch, a refresh), and
/// [`Self::set_cookies`] adds what was written.
#[derive(Clone)]
pub struct RequestCookies {
    /// The `Cookie` field values, as sent.
    sent: Vec<Bytes>,
    jar: OnceLock<Cookies>,
    /// The jar is ours (not the manager's): its `Set-Cookie`s are added by [`Self::set_cookies`].
    standalone: bool,
}

impl std::fmt::Debug for RequestCookies {
    // The values are session cookies: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestCookies({} names sent)", self.pairs().count())
    }
}

impl RequestCookies {
    /// The cookies of a request that passed tower-cookies' manager, which made `jar`.
    pub fn new(headers: &HeaderMap, jar: Cookies) -> Self {
        Self {
            sent: from_map(headers),
            jar: OnceLock::from(jar),
            standalone: false,
        }
    }

    /// A request that sent no cookie, writing to `jar` (tests and fuzzing read what was written
    /// back with [`Self::sent_back`]).
    pub fn writing_to(jar: Cookies) -> Self {
        Self::new(&HeaderMap::new(), jar)
    }

    /// The cookies of a request that does not pass tower-cookies' manager (an API call): those
    /// in `fields`, or without any there, in its map. Answer it through [`Self::set_cookies`].
    pub fn standalone(headers: &HeaderMap, fields: CookieFields) -> Self {
        Self {
            sent: if fields.0.is_empty() {
                from_map(headers)
            } else {
                fields.0
            },
            jar: OnceLock::new(),
            standalone: true,
        }
    }

    /// The `Cookie` field values sent, as they came.
    pub fn fields(&self) -> &[Bytes] {
        &self.sent
    }

    /// Adds to `answer` a `Set-Cookie` for every cookie written, as tower-cookies' manager does
    /// for its jar (nothing for a jar of the manager's). The jar of a standalone request starts
    /// empty and tokengate clears a cookie by writing an expired one (never `Cookies::remove`),
    /// so what it lists is exactly what was written.
    pub fn set_cookies(&self, answer: &mut HeaderMap) {
        let Some(jar) = self.jar.get().filter(|_| self.standalone) else {
            return;
        };
        for c in jar.list() {
            if let Ok(v) = HeaderValue::from_str(&c.to_string()) {
                answer.append(header::SET_COOKIE, v);
            }
        }
    }

    /// Names of the cookies in the jar, if there is one yet: those sent (decoded) and written
    /// (the manager's), or written (a standalone request's).
    fn jar_names(&self) -> Vec<String> {
        self.jar.get().map_or_else(Vec::new, |jar| {
            jar.list().iter().map(|c| c.name().to_string()).collect()
        })
    }

    /// (name, value) of every cookie sent, in order; pairs without `=` or without a name, and
    /// pairs that are not UTF-8, are skipped.
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sent.iter().flat_map(|v| {
            cookie_pairs(v).filter_map(|(n, v)| {
                Some((std::str::from_utf8(n).ok()?, std::str::from_utf8(v).ok()?))
            })
        })
    }

    /// What a browser holding `jar`'s cookies sends back: one `Cookie` header (tests and fuzzing
    /// read what `write_session` wrote this way). Values that cannot be sent are left out.
    pub fn sent_back(jar: &Cookies) -> Self {
        let line = jar
            .list()
            .iter()
            .map(|c| format!("{}={}", c.name(), c.value()))
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&line) {
            headers.insert(header::COOKIE, v);
        }
        Self::new(&headers, Cookies::default())
    }

    /// The value of the last cookie named `name` that the browser sent (only its value is
    /// checked for UTF-8: a session cookie is kilobytes long, the others need no check).
    pub fn sent(&self, name: &str) -> Option<&str> {
        self.sent_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// [`Self::sent`], as the bytes sent.
    pub fn sent_bytes(&self, name: &str) -> Option<&[u8]> {
        self.sent
            .iter()
            .flat_map(|v| cookie_pairs(v))
            .filter(|(n, _)| *n == name.as_bytes())
            .last()
            .map(|(_, v)| v)
    }
}

/// The `Cookie` values in `headers` (copied: the map's values do not hand out their bytes).
fn from_map(headers: &HeaderMap) -> Vec<Bytes> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| Bytes::copy_from_slice(v.as_bytes()))
        .collect()
}

/// The `Cookie` field values of a request that are not in its `HeaderMap` (empty when the map
/// holds them). Our server loop ([`crate::server`]) keeps them out of the map of an API call:
/// there each value would be checked byte by byte once more (httparse has checked it), and a
/// session cookie is a kilobyte or two long (~4 % of an API call, callgrind). The values are
/// session cookies: never printed.
#[derive(Default)]
pub struct CookieFields(Vec<Bytes>);

impl CookieFields {
    /// Values httparse accepted (no CR, LF or other control byte but tab: what `HeaderValue`
    /// takes too).
    pub fn new(values: Vec<Bytes>) -> Self {
        Self(values)
    }

    /// Their size as header fields (`cookie: value` and the line end), as a limit counts it.
    pub fn size(&self) -> usize {
        self.0.iter().map(|v| "cookie".len() + v.len() + 4).sum()
    }

    /// Puts them into `headers`, for what reads cookies only there (the router, its cookie
    /// manager).
    pub fn into_map(self, headers: &mut HeaderMap) {
        for v in self.0 {
            if let Ok(v) = HeaderValue::from_maybe_shared(v) {
                headers.append(header::COOKIE, v);
            }
        }
    }
}

/// The `name=value` pairs of one `Cookie` header value: split at `;` (with `memchr`: a session
/// cookie is kilobytes long), trimmed; pieces without `=` or without a name are skipped.
pub fn cookie_pairs(value: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    cookie_pieces(value).filter_map(|piece| {
        let eq = memchr::memchr(b'=', piece)?;
        let name = piece[..eq].trim_ascii();
        (!name.is_empty()).then(|| (name, piece[eq + 1..].trim_ascii()))
    })
}

/// The `;`-separated pieces of one `Cookie` header value, as sent (not trimmed).
pub fn cookie_pieces(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b';', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Writes go to the jar.
impl std::ops::Deref for RequestCookies {
    type Target = Cookies;
    fn deref(&self) -> &Cookies {
        self.jar.get_or_init(Cookies::default)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestCookies {
    type Rejection = <Cookies as FromRequestParts<S>>::Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let jar = Cookies::from_request_parts(parts, state).await?;
        Ok(Self::new(&parts.headers, jar))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_under_https_get_the_host_prefix() {
        let r = CookieRules::new(true);
        assert_eq!(r.session_name(), "__Host-tg_session");
        assert_eq!(r.tx_name("abc"), "__Host-tg_tx_abc");
        assert!(r.is_ours("__Host-tg_session"));
        assert!(r.is_ours("__Host-tg_session.3"));
        assert!(r.is_ours("__Host-tg_tx_abc"));
        assert!(
            !r.is_ours("tg_session"),
            "an unprefixed look-alike is not ours under https"
        );
        assert!(!r.is_ours("__Host-tg_session.x"));
        assert!(!r.is_ours("other"));
    }

    #[test]
    fn attributes() {
        let r = CookieRules::new(true);
        let c = r.build(
            "n".into(),
            "v".into(),
            SameSite::Strict,
            Duration::from_secs(60),
        );
        let s = c.to_string();
        for attr in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(s.contains(attr), "{attr} missing in {s}");
        }
        let plain = CookieRules::new(false).build(
            "n".into(),
            "v".into(),
            SameSite::Lax,
            Duration::from_secs(1),
        );
        assert!(!plain.to_string().contains("Secure"));
    }

    #[test]
    fn request_cookies_read_what_was_sent_last_wins() {
        let mut headers = HeaderMap::new();
        for v in [
            &b"a=1; tg_session = first ;junk; =x"[..],
            b"\xff=\xfe",
            b"b=2;tg_session=second",
        ] {
            headers.append(header::COOKIE, HeaderValue::from_bytes(v).expect("value"));
        }
        let c = RequestCookies::new(&headers, Cookies::default());
        assert_eq!(c.sent("tg_session"), Some("second"));
        assert_eq!(c.sent("a"), Some("1"));
        assert_eq!(c.sent("junk"), None);
        assert_eq!(c.sent(""), None);
        let r = CookieRules::new(false);
        assert_eq!(r.read_session(&c).as_deref(), Some(&b"second"[..]));
        let none = RequestCookies::new(&HeaderMap::new(), Cookies::default());
        assert!(r.read_session(&none).is_none());
        assert!(!r.has_session_cookie(&none));
        assert!(
            !format!("{c:?}").contains("second"),
            "a cookie value in Debug"
        );
    }

    #[test]
    fn large_sessions_are_chunked_and_reassembled() {
        let r = CookieRules::new(false);
        let jar = RequestCookies::standalone(&HeaderMap::new(), CookieFields::default());
        let big = "a".repeat(CHUNK * 2 + 10);
        assert!(r.write_session(&jar, &big, Duration::from_secs(60)));
        assert!(jar.get("tg_session.0").is_some());
        assert!(jar.get("tg_session.2").is_some());
        // What the browser sends back: the chunks, in any order, among other cookies.
        let mut sent: Vec<String> = jar
            .list()
            .iter()
            .map(|c| format!("{}={}", c.name(), c.value()))
            .collect();
        sent.reverse();
        sent.push("other=1".into());
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&sent.join("; ")).expect("header"),
        );
        let back = RequestCookies::new(&headers, Cookies::default());
        assert_eq!(r.read_session(&back).as_deref(), Some(big.as_bytes()));
        assert!(r.has_session_cookie(&back));
        assert!(!r.write_session(
            &jar,
            &"a".repeat(CHUNK * MAX_CHUNKS + 1),
            Duration::from_secs(1)
        ));
    }

    /// Every `Set-Cookie` of `answer` as (name, value, expired).
    fn set_cookies(answer: &HeaderMap) -> Vec<(String, String, bool)> {
        let mut out: Vec<_> = answer
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| {
                let c = Cookie::parse(v.to_str().expect("ascii").to_string()).expect("cookie");
                let gone = c.max_age().is_some_and(|a| a.is_zero());
                (c.name().to_string(), c.value().to_string(), gone)
            })
            .collect();
        out.sort();
        out
    }

    /// What `c` adds to an answer, as [`set_cookies`] lists it.
    fn answer_of(c: &RequestCookies) -> Vec<(String, String, bool)> {
        let mut answer = HeaderMap::new();
        c.set_cookies(&mut answer);
        set_cookies(&answer)
    }

    fn sent(line: &str) -> RequestCookies {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(line).expect("header"));
        RequestCookies::standalone(&headers, CookieFields::default())
    }

    #[test]
    fn a_standalone_request_sets_exactly_what_it_wrote() {
        let r = CookieRules::new(false);
        // Nothing written: nothing set (and no jar made).
        let quiet = sent("tg_session=abc; other=1");
        let mut answer = HeaderMap::new();
        quiet.set_cookies(&mut answer);
        assert!(answer.is_empty());
        assert!(quiet.jar.get().is_none());

        // A session sent in three chunks, rewritten whole: the chunks the browser holds are
        // cleared (their names come from the header, the jar started empty).
        let chunked = sent("tg_session.0=a; tg_session.1=b; tg_session.2=c; other=1");
        assert!(r.write_session(&chunked, "fresh", Duration::from_secs(60)));
        assert_eq!(
            answer_of(&chunked),
            vec![
                ("tg_session".into(), "fresh".into(), false),
                ("tg_session.0".into(), String::new(), true),
                ("tg_session.1".into(), String::new(), true),
                ("tg_session.2".into(), String::new(), true),
            ]
        );

        // Written twice in one request (large, then small): the first write's chunks go too.
        let twice = sent("other=1");
        let big = "a".repeat(CHUNK + 10);
        assert!(r.write_session(&twice, &big, Duration::from_secs(60)));
        assert!(r.write_session(&twice, "small", Duration::from_secs(60)));
        assert_eq!(
            answer_of(&twice),
            vec![
                ("tg_session".into(), "small".into(), false),
                ("tg_session.0".into(), String::new(), true),
                ("tg_session.1".into(), String::new(), true),
            ]
        );

        // Cleared: the session cookie and every chunk sent; another cookie is left alone.
        let ending = sent("tg_session.0=a; tg_session.1=b; other=1");
        r.clear_session(&ending);
        assert_eq!(
            answer_of(&ending),
            vec![
                ("tg_session".into(), String::new(), true),
                ("tg_session.0".into(), String::new(), true),
                ("tg_session.1".into(), String::new(), true),
            ]
        );
    }

    #[test]
    fn a_managed_request_leaves_set_cookies_to_the_manager() {
        let r = CookieRules::new(false);
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("tg_session=abc"));
        let managed = RequestCookies::new(&headers, Cookies::default());
        r.clear_session(&managed);
        assert!(managed.get("tg_session").is_some(), "written to the jar");
        let mut answer = HeaderMap::new();
        managed.set_cookies(&mut answer);
        assert!(answer.is_empty(), "the manager adds them, not us");
    }
}
