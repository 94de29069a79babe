//! What this process knows of login transactions beyond their cookies: states consumed (so a
//! replayed copy of a transaction cookie is refused: RFC 9700 §4.2.4, state is single use) and
//! logins pending (for the `tokengate_pending_logins` gauge). Keys are SHA-256 of the state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Bound on remembered states: under a flood expired entries go first; memory stays flat.
const MAX_ENTRIES: usize = 200_000;
/// Expired entries are also dropped once a minute, so memory follows the logins of the last
/// transaction lifetime rather than growing to the bound.
const SWEEP_EVERY_S: u64 = 60;

#[derive(Default)]
pub struct LoginLedger {
    used: Mutex<HashMap<[u8; 32], u64>>,
    pending: Mutex<HashMap<[u8; 32], u64>>,
    /// Unix second from which the next sweep is due.
    next_sweep: AtomicU64,
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
    /// Drops expired entries of both maps when a sweep is due.
    fn sweep(&self, now: u64) {
        let next = self.next_sweep.load(Ordering::Relaxed);
        if now < next
            || self
                .next_sweep
                .compare_exchange(
                    next,
                    now + SWEEP_EVERY_S,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        for map in [&self.pending, &self.used] {
            if let Ok(mut m) = map.lock() {
                m.retain(|_, exp| *exp > now);
            }
        }
    }

    /// A login started; it is pending until `until` (Unix seconds).
    pub fn started(&self, state: &str, until: u64, now: u64) {
        self.sweep(now);
        if let Ok(mut p) = self.pending.lock() {
            insert_bounded(&mut p, key(state), until, now);
        }
    }

    /// Marks `state` used until `until`; false if it was used before (a replay).
    pub fn first_use(&self, state: &str, until: u64, now: u64) -> bool {
        self.sweep(now);
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

    #[test]
    fn expired_states_are_swept_without_waiting_for_the_bound() {
        let l = LoginLedger::default();
        let len = |m: &Mutex<HashMap<[u8; 32], u64>>| m.lock().map(|m| m.len()).unwrap_or(0);
        l.started("a", 100, 0);
        assert!(l.first_use("a", 100, 1));
        l.started("b", 1000, 2);
        l.started("c", 50, 3);
        assert_eq!((len(&l.used), len(&l.pending)), (1, 2));
        // At 120 s a sweep is due: "a" (used until 100) and "c" (pending until 50) go.
        l.started("d", 1000, 120);
        assert_eq!((len(&l.used), len(&l.pending)), (0, 2));
        // Still refused while remembered: a replay of "b" after its use.
        assert!(l.first_use("b", 1000, 121));
        assert!(!l.first_use("b", 1000, 500));
    }
}
