//! Sealing for everything tokengate puts in a cookie: XChaCha20-Poly1305 with a random 192-bit nonce,
//! the cookie's name as associated data (a sealed value cannot be moved to another cookie), and a key
//! list for rotation: the first key seals, every key opens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// The session keys, ready to use.
#[derive(Clone)]
pub struct Sealer {
    ciphers: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer([{} keys redacted])", self.ciphers.len())
    }
}

impl Sealer {
    /// `keys` must not be empty (config validation guarantees it).
    pub fn new(keys: &[[u8; 32]]) -> Self {
        Self {
            ciphers: keys
                .iter()
                .map(|k| XChaCha20Poly1305::new(k.into()))
                .collect(),
        }
    }

    /// Encrypts `plaintext` bound to `aad`; the result is cookie-safe base64url.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = &self.ciphers[0];
        // Encryption with a valid key and in-memory buffers cannot fail.
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Decrypts a value made by [`Sealer::seal`] with any configured key; `None` when it was not
    /// made by us, was tampered with, or belongs to another cookie.
    pub fn open(&self, aad: &[u8], sealed: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(sealed.as_ref()).ok()?;
        if raw.len() < 1 + NONCE_LEN + 16 || raw[0] != VERSION {
            return None;
        }
        let nonce = XNonce::from_slice(&raw[1..1 + NONCE_LEN]);
        let ct = &raw[1 + NONCE_LEN..];
        self.ciphers
            .iter()
            .find_map(|c| c.decrypt(nonce, Payload { msg: ct, aad }).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rotation() {
        let old = Sealer::new(&[[1u8; 32]]);
        let sealed = old.seal(b"tg_session", b"hello");
        assert_eq!(
            old.open(b"tg_session", &sealed).as_deref(),
            Some(&b"hello"[..])
        );
        // New key first, old key still opens old cookies.
        let rotated = Sealer::new(&[[2u8; 32], [1u8; 32]]);
        assert_eq!(
            rotated.open(b"tg_session", &sealed).as_deref(),
            Some(&b"hello"[..])
        );
        // New seals are not readable with the old key alone.
        let fresh = rotated.seal(b"tg_session", b"x");
        assert!(old.open(b"tg_session", &fresh).is_none());
    }

    #[test]
    fn tampering_and_wrong_cookie_are_rejected() {
        let s = Sealer::new(&[[7u8; 32]]);
        let sealed = s.seal(b"a", b"payload");
        assert!(s.open(b"b", &sealed).is_none(), "aad binds the cookie name");
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).expect("b64");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(s.open(b"a", URL_SAFE_NO_PAD.encode(bytes)).is_none());
        for junk in ["", "!!!", "AAAA", &"A".repeat(200)] {
            assert!(s.open(b"a", junk).is_none());
        }
    }

    #[test]
    fn nonces_differ() {
        let s = Sealer::new(&[[7u8; 32]]);
        assert_ne!(s.seal(b"a", b"same"), s.seal(b"a", b"same"));
    }
}
