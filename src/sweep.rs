//! Time-driven pruning for the in-memory maps that remember recent events (refreshes, rotations,
//! login states, opened sessions). Each map drops its expired entries at least once per period,
//! so its memory follows the live load: a count bound alone would let a quiet process keep every
//! entry until the bound is reached (which the soak showed as RSS creeping up for tens of
//! minutes).

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

/// A map (or any collection) with the time of its last sweep.
#[derive(Debug, Default)]
pub struct Swept<M> {
    inner: M,
    last: Option<Instant>,
}

impl<M> Swept<M> {
    /// True (and the sweep counted as done) when none was done within `every` before `now`.
    pub fn due(&mut self, now: Instant, every: Duration) -> bool {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

impl<M> Deref for Swept<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.inner
    }
}

impl<M> DerefMut for Swept<M> {
    fn deref_mut(&mut self) -> &mut M {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_period() {
        let mut s: Swept<Vec<u8>> = Swept::default();
        let t0 = Instant::now();
        assert!(s.due(t0, Duration::from_secs(30)), "never swept: due");
        assert!(!s.due(t0 + Duration::from_secs(29), Duration::from_secs(30)));
        assert!(s.due(t0 + Duration::from_secs(30), Duration::from_secs(30)));
        assert!(!s.due(t0 + Duration::from_secs(31), Duration::from_secs(30)));
        assert!(s.due(t0 + Duration::from_secs(61), Duration::from_secs(30)));
        // A clock read out of order never panics nor sweeps.
        assert!(!s.due(t0, Duration::from_secs(30)));
        s.push(1);
        assert_eq!(s.len(), 1);
    }
}
