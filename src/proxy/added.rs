//! The fields tokengate sets on an API call (`Authorization`, `X-Forwarded-For/-Proto/-Host`,
//! the SPA's own cookies without ours), kept out of the request's `HeaderMap`: our upstream
//! client ([`super::upstream::h1::encode_head`]) writes them into the request head after the
//! map's fields. Inserting each into the map (a hash, a probe, a value checked again) only for
//! the head to read it out once cost a few percent of a call (callgrind). A request the hyper
//! client sends (one with a body), or one that may go again with a fresh DPoP proof, gets them
//! put into its map instead ([`Added::insert_into`]).
//!
//! The rules that make these fields ([`super::headers`]) first drop what the browser sent under
//! the same names, so a field is never in both places.

use http::{header, HeaderMap, HeaderName, HeaderValue};

use super::headers::DPOP;
use super::passthrough::fields;

/// Fields for the upstream request: `name: value\r\n` lines.
#[derive(Clone, Debug, Default)]
pub struct Added {
    lines: Vec<u8>,
}

/// Whether `value` may be a field value: what `HeaderValue` takes (visible ASCII, space, tab,
/// obs-text), so no CR, LF, NUL or other control byte can split the head. No early exit: the
/// check of a long value runs as wide as the machine goes.
pub fn valid_value(value: &[u8]) -> bool {
    value.iter().fold(true, |ok, &b| {
        ok & ((b >= 0x20 && b != 0x7f) | (b == b'\t'))
    })
}

impl Added {
    /// Room for about `bytes` of fields.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            lines: Vec::with_capacity(bytes),
        }
    }

    /// Adds `name: value`, the value given in pieces written one after another. A value that is
    /// not a valid field value is not added (false), as `HeaderValue` would refuse it.
    pub fn push(&mut self, name: &HeaderName, value: &[&[u8]]) -> bool {
        if !value.iter().all(|p| valid_value(p)) {
            return false;
        }
        let len: usize = value.iter().map(|p| p.len()).sum();
        self.lines.reserve(name.as_str().len() + len + 4);
        self.lines.extend_from_slice(name.as_str().as_bytes());
        self.lines.extend_from_slice(b": ");
        for p in value {
            self.lines.extend_from_slice(p);
        }
        self.lines.extend_from_slice(b"\r\n");
        true
    }

    /// Adds the fields of `other` (made once, written as they are: see
    /// [`super::headers::ProtoHost`]).
    pub fn extend(&mut self, other: &Added) {
        self.lines.extend_from_slice(&other.lines);
    }

    /// The lines, to be written after the request's other fields.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Puts the fields into `headers`, after those already there (`Authorization` and `DPoP`
    /// marked sensitive), and empties `self`: for a client that knows only the map.
    pub fn insert_into(&mut self, headers: &mut HeaderMap) {
        for (name, value) in fields(&self.lines) {
            // Our own names, and values checked by `push`: never refused.
            if let (Ok(name), Ok(mut value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                if name == header::AUTHORIZATION || name == DPOP {
                    value.set_sensitive(true);
                }
                headers.append(name, value);
            }
        }
        self.lines.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_could_split_the_head_are_not_added() {
        let mut a = Added::default();
        for bad in [
            &b"a\r\nx-injected: 1"[..],
            b"a\nb",
            b"a\rb",
            b"\0",
            b"\x7f",
            b"\x1b[0m",
        ] {
            assert!(!valid_value(bad), "{bad:?}");
            assert!(HeaderValue::from_bytes(bad).is_err(), "{bad:?}");
            assert!(!a.push(&header::AUTHORIZATION, &[b"Bearer ", bad]));
        }
        assert!(a.lines().is_empty());
        // What HeaderValue takes, this takes, at every length (the fold has no tail of its own).
        for b in 0..=255u8 {
            for n in [1, 15, 16, 17, 31, 32, 33, 64, 100] {
                let v = vec![b; n];
                assert_eq!(
                    valid_value(&v),
                    HeaderValue::from_bytes(&v).is_ok(),
                    "{b} x {n}"
                );
            }
        }
    }

    #[test]
    fn fields_are_written_as_lines_and_go_into_a_map_the_same() {
        let mut a = Added::with_capacity(64);
        assert!(a.push(&header::AUTHORIZATION, &[b"Bearer ", b"tok"]));
        assert!(a.push(&header::COOKIE, &[b"theme=dark; lang=en"]));
        assert!(a.push(&DPOP, &[b"proof"]));
        assert!(a.push(
            &HeaderName::from_static("x-forwarded-for"),
            &[b"", b"10.0.0.1"]
        ));
        assert_eq!(
            a.lines(),
            b"authorization: Bearer tok\r\ncookie: theme=dark; lang=en\r\ndpop: proof\r\n\
              x-forwarded-for: 10.0.0.1\r\n"
        );
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        a.insert_into(&mut h);
        assert!(a.lines().is_empty());
        let listed: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().expect("ascii"), v.is_sensitive()))
            .collect();
        assert_eq!(
            listed,
            [
                ("accept", "*/*", false),
                ("authorization", "Bearer tok", true),
                ("cookie", "theme=dark; lang=en", false),
                ("dpop", "proof", true),
                ("x-forwarded-for", "10.0.0.1", false),
            ]
        );
    }
}
