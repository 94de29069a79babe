//! What this process knows of login transactions beyond their cookies: states consumed (so a
//! replayed copy of a transaction cookie is refused: RFC 9700 §4.2.4, state is single use) and
//! logins pending (for the `tokengate_pending_logins` gauge). Keys are SHA-256 of the state.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Bound on remembered states: under a flood expired entries go first; memory stays flat.
const MAX_ENTRIES: usize = 200_000;

#[derive(Default)]
pub struct LoginLedger {
    used: Mutex<HashMap<[u8; 32], u64>>,
    pending: Mutex<HashMap<[u8; 32], u64>>,
}

fn key(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

fn insert_bounded(map: &mut HashMap<[u8; 32], u64>, k: [u8; 32], until: u64, now: u64) -> bool {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, exp| *exp > now);
        if map.len() >= MAX_ENTRIES {
            return false;
        }
    }
    map.insert(k, until);
    true
}

impl LoginLedger {
    /// A login started; it is pending until `until` (Unix seconds).
    pub fn started(&self, state: &str, until: u64, now: u64) {
        if let Ok(mut p) = self.pending.lock() {
            insert_bounded(&mut p, key(state), until, now);
        }
    }

    /// Marks `state` used until `until`; false if it was used before (a replay).
    pub fn first_use(&self, state: &str, until: u64, now: u64) -> bool {
        let k = key(state);
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&k);
        }
        let Ok(mut used) = self.used.lock() else {
            return false;
        };
        if used.get(&k).is_some_and(|exp| *exp > now) {
            return false;
        }
        // Full of live entries (a flood): refuse rather than forget a used state.
        insert_bounded(&mut used, k, until, now)
    }

    /// Logins started and neither completed nor expired.
    pub fn pending(&self, now: u64) -> usize {
        self.pending
            .lock()
            .map(|mut p| {
                p.retain(|_, exp| *exp > now);
                p.len()
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_single_use_until_expiry() {
        let l = LoginLedger::default();
        l.started("s1", 100, 0);
        assert_eq!(l.pending(0), 1);
        assert!(l.first_use("s1", 100, 1));
        assert_eq!(l.pending(1), 0);
        assert!(!l.first_use("s1", 100, 2), "replay refused");
        assert!(l.first_use("s2", 100, 2));
        assert_eq!(l.pending(200), 0);
    }
}
