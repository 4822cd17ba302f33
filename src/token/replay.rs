//! A bounded memory of request ids seen recently, so that a token is accepted at most once.
//!
//! Entries are kept until the token they came from has expired (plus clock skew); after that the
//! token itself is refused as expired, so forgetting the id is safe. When the cache is full of
//! live entries it refuses new tokens rather than forget one early: failing closed is the only
//! answer that keeps the replay guarantee.

use super::TokenError;
use std::collections::{HashSet, VecDeque};

/// Request ids and their expiry, bounded in entries.
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashSet<u128>,
    /// (forget-after in Unix ms, id), in insertion order; tokens are minted with one lifetime,
    /// so this is close to sorted by expiry and pruning from the front is enough.
    order: VecDeque<(u64, u128)>,
    capacity: usize,
}

impl ReplayCache {
    /// An empty cache that holds at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Records `id` until `forget_after_ms`; refuses an id already present.
    pub fn insert(
        &mut self,
        id: u128,
        forget_after_ms: u64,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        self.prune(now_ms);
        if self.seen.len() >= self.capacity {
            return Err(if self.seen.contains(&id) {
                TokenError::Replayed
            } else {
                TokenError::ReplayCacheFull
            });
        }
        // One look-up on the common path: `insert` says whether the id was there.
        if !self.seen.insert(id) {
            return Err(TokenError::Replayed);
        }
        self.order.push_back((forget_after_ms, id));
        Ok(())
    }

    fn prune(&mut self, now_ms: u64) {
        while let Some(&(until, id)) = self.order.front() {
            if until >= now_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&id);
        }
        if self.order.capacity() > 1024 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len() * 2);
            self.seen.shrink_to(self.seen.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_seen_id_until_it_expires() {
        let mut c = ReplayCache::new(10);
        assert!(c.insert(1, 100, 0).is_ok());
        assert_eq!(c.insert(1, 100, 50), Err(TokenError::Replayed));
        assert_eq!(c.insert(1, 100, 100), Err(TokenError::Replayed));
        // After expiry the id is forgotten (the token itself is then refused as expired).
        assert!(c.insert(1, 300, 101).is_ok());
    }

    #[test]
    fn full_of_live_entries_fails_closed() {
        let mut c = ReplayCache::new(3);
        for id in 0..3 {
            c.insert(id, 1_000, 0).unwrap();
        }
        assert_eq!(c.insert(99, 1_000, 10), Err(TokenError::ReplayCacheFull));
        // A replay is still called one when the cache is full.
        assert_eq!(c.insert(1, 1_000, 10), Err(TokenError::Replayed));
        assert_eq!(c.len(), 3);
        // Once old entries expire there is room again.
        assert!(c.insert(99, 3_000, 1_001).is_ok());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn memory_stays_bounded_under_churn() {
        let mut c = ReplayCache::new(1_000);
        for i in 0..100_000u64 {
            // 10 live ids at any time.
            c.insert(i as u128, i + 10, i).unwrap();
        }
        assert!(c.len() <= 11);
        assert!(c.order.capacity() < 4096, "capacity {}", c.order.capacity());
    }
}
