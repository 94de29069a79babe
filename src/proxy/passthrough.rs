//! The fields of an API's answer that tokengate passes on as they came, without building them
//! into the answer's `HeaderMap`: on the way back only a few fields are read, replaced or
//! dropped (the hop-by-hop ones, the framing, `Cache-Control`, `Set-Cookie`, `X-Request-Id`);
//! the rest (`Server`, `Date`, `Content-Type`, `ETag`, the API's own...) only needs to reach the
//! browser. Parsing each of them into a `HeaderName` and a `HeaderValue`, hashing them into a
//! map and reading them out again cost about a tenth of an API call (callgrind).
//!
//! So the upstream client ([`super::upstream::h1`]) puts the fields tokengate [`inspected`] into
//! the `HeaderMap` as before (every header rule sees them and works as it did), and the others
//! into [`Passed`], a response extension: our server loop writes its lines after the map's, and
//! the other way an answer leaves ([`expanded`], hyper's connection) puts them into the map
//! first. Only answers to API calls that our server loop may write carry one, and only when no
//! rule reads other fields (DPoP reads `DPoP-Nonce` and `WWW-Authenticate`).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue};

/// True when fields named `name` (as received, any case) must go into the answer's `HeaderMap`:
/// those tokengate reads, replaces or drops on an answer's way back. The hop-by-hop ones (RFC
/// 9110 §7.6.1 and legacy, as `headers::strip_hop_by_hop` drops them), the framing, and what the
/// proxy, the edge and the request log set. By length first: most names are ruled out without a
/// comparison (the test's list says which names).
pub fn inspected(name: &[u8]) -> bool {
    let is = |n: &[u8]| n.eq_ignore_ascii_case(name);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive") || is(b"set-cookie"),
        12 => is(b"x-request-id"),
        13 => is(b"cache-control"),
        14 => is(b"content-length"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// True when a `Connection` field value names a field other than `close` and `keep-alive`: that
/// field is hop-by-hop too, and only the map's rules know to drop it (such answers carry no
/// [`Passed`]).
pub fn lists_fields(connection: &[u8]) -> bool {
    if connection.eq_ignore_ascii_case(b"keep-alive") || connection.eq_ignore_ascii_case(b"close") {
        return false;
    }
    connection.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// An answer's fields passed on as they came: `name: value\r\n` lines (names and values as
/// httparse accepted them: no CR, LF or other control byte can be in them).
#[derive(Clone, Debug, Default)]
pub struct Passed {
    lines: Bytes,
    dated: bool,
}

impl Passed {
    /// The lines, to be written after the answer's other fields.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// True when one of them is `Date` (the server then adds none).
    pub fn dated(&self) -> bool {
        self.dated
    }
}

/// Builds a [`Passed`] field by field.
pub struct Lines {
    out: BytesMut,
    dated: bool,
}

impl Lines {
    /// Room for about `bytes` of fields.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            out: BytesMut::with_capacity(bytes),
            dated: false,
        }
    }

    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        self.dated |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        self.out.reserve(name.len() + value.len() + 4);
        self.out.put_slice(name);
        self.out.put_slice(b": ");
        self.out.put_slice(value);
        self.out.put_slice(b"\r\n");
    }

    pub fn done(self) -> Passed {
        Passed {
            lines: self.out.freeze(),
            dated: self.dated,
        }
    }
}

/// `resp` with its passed fields (if any) put into its `HeaderMap`, after the fields already
/// there: for a writer that knows only the map (hyper's connection).
pub fn expanded<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let Some(passed) = resp.extensions_mut().remove::<Passed>() else {
        return resp;
    };
    let headers = resp.headers_mut();
    for (name, value) in fields(&passed.lines) {
        // Both were accepted by httparse, which takes what these take: never refused.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_maybe_shared(passed.lines.slice_ref(value)),
        ) {
            headers.append(name, value);
        }
    }
    resp
}

/// The `(name, value)` of each line.
pub(super) fn fields(lines: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    lines
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_suffix(b"\r"))
        .filter_map(|l| {
            let colon = l.iter().position(|&b| b == b':')?;
            let (name, value) = l.split_at(colon);
            Some((name, value.get(2..).unwrap_or_default()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names [`inspected`] takes.
    const INSPECTED: &[&[u8]] = &[
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"cache-control",
        b"set-cookie",
        b"x-request-id",
    ];

    fn passed(fields: &[(&str, &str)]) -> Passed {
        let mut l = Lines::with_capacity(16);
        for (n, v) in fields {
            l.push(n.as_bytes(), v.as_bytes());
        }
        l.done()
    }

    #[test]
    fn inspected_names_match_in_any_case_and_nothing_else() {
        for n in INSPECTED {
            assert!(inspected(n));
            assert!(inspected(&n.to_ascii_uppercase()));
        }
        for n in [
            "server",
            "date",
            "content-type",
            "etag",
            "set-cookie2",
            "x-request-ids",
            "tee",
            "www-authenticate",
            "",
        ] {
            assert!(!inspected(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn connection_values_naming_fields_are_told_apart() {
        for v in ["close", "keep-alive", "Keep-Alive, close", " close ,", ""] {
            assert!(!lists_fields(v.as_bytes()), "{v}");
        }
        for v in ["x-hop", "close, X-Secret", "keep-alive,te"] {
            assert!(lists_fields(v.as_bytes()), "{v}");
        }
    }

    #[test]
    fn lines_are_written_as_received_and_date_is_noticed() {
        let p = passed(&[("Server", "nginx"), ("X-Empty", ""), ("ETag", "\"a:b\"")]);
        assert_eq!(
            p.lines(),
            b"Server: nginx\r\nX-Empty: \r\nETag: \"a:b\"\r\n"
        );
        assert!(!p.dated());
        assert!(passed(&[("DATE", "Mon, 07 Dec 2026 18:00:00 GMT")]).dated());
    }

    #[test]
    fn expanded_appends_every_passed_field_after_the_maps() {
        let mut resp = http::Response::new(());
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        resp.extensions_mut().insert(passed(&[
            ("Server", "nginx"),
            ("x-api", "1"),
            ("X-API", "two: with colon"),
            ("x-empty", ""),
        ]));
        let resp = expanded(resp);
        assert!(resp.extensions().get::<Passed>().is_none());
        let h = resp.headers();
        let got: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        assert_eq!(
            got,
            vec![
                ("cache-control", &b"no-store"[..]),
                ("server", b"nginx"),
                ("x-api", b"1"),
                ("x-api", b"two: with colon"),
                ("x-empty", b""),
            ]
        );
        // Without passed fields the answer is left as it is.
        let plain = expanded(http::Response::new(()));
        assert!(plain.headers().is_empty());
    }
}
