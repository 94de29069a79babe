//! The only place tokengate's `Set-Cookie`s are built: names, attributes, and the splitting of a
//! large sealed session across several cookies (browsers cap one cookie at about 4 KB).
//!
//! Rules (interface.md): HttpOnly always; SameSite=Strict for the session, Lax for the login
//! transaction (it must survive the top-level redirect back from the IdP); Path=/; `Secure` and the
//! `__Host-` prefix whenever `public_url` is https.

use std::time::Duration;

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

    /// The sealed session value the browser sent, reassembled from its chunks.
    pub fn read_session(&self, cookies: &Cookies) -> Option<String> {
        if let Some(c) = cookies.get(&self.session_name) {
            if !c.value().is_empty() {
                return Some(c.value().to_string());
            }
        }
        let mut out = String::new();
        for i in 0..MAX_CHUNKS {
            match cookies.get(&format!("{}.{i}", self.session_name)) {
                Some(c) if !c.value().is_empty() => out.push_str(c.value()),
                _ => break,
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// True when the browser sent any session cookie or chunk.
    pub fn has_session_cookie(&self, cookies: &Cookies) -> bool {
        cookies.list().iter().any(|c| {
            let n = c.name();
            n == self.session_name || (self.is_ours(n) && !n.starts_with(&self.tx_prefix))
        })
    }

    /// Writes a sealed session, split when large; stale chunks are removed. Returns false when the
    /// value does not fit in [`MAX_CHUNKS`] cookies.
    pub fn write_session(&self, cookies: &Cookies, sealed: &str, max_age: Duration) -> bool {
        let present: Vec<String> = cookies
            .list()
            .into_iter()
            .map(|c| c.name().to_string())
            .filter(|n| self.is_ours(n) && !n.starts_with(&self.tx_prefix))
            .collect();
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

    /// Clears the session cookie and every chunk the browser sent (or might hold).
    pub fn clear_session(&self, cookies: &Cookies) {
        let mut names: Vec<String> = cookies
            .list()
            .into_iter()
            .map(|c| c.name().to_string())
            .filter(|n| self.is_ours(n) && !n.starts_with(&self.tx_prefix))
            .collect();
        if !names.contains(&self.session_name) {
            names.push(self.session_name.clone());
        }
        for n in names {
            cookies.add(self.removal(n, SameSite::Strict));
        }
    }

    /// Clears every tokengate cookie the browser sent: session, chunks, login transactions.
    pub fn clear_all(&self, cookies: &Cookies) {
        self.clear_session(cookies);
        for n in self.tx_names(cookies) {
            self.clear_tx(cookies, &n);
        }
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
    fn large_sessions_are_chunked_and_reassembled() {
        let r = CookieRules::new(false);
        let jar = Cookies::default();
        let big = "a".repeat(CHUNK * 2 + 10);
        assert!(r.write_session(&jar, &big, Duration::from_secs(60)));
        assert!(jar.get("tg_session.0").is_some());
        assert!(jar.get("tg_session.2").is_some());
        assert_eq!(r.read_session(&jar).as_deref(), Some(big.as_str()));
        assert!(!r.write_session(
            &jar,
            &"a".repeat(CHUNK * MAX_CHUNKS + 1),
            Duration::from_secs(1)
        ));
    }
}
