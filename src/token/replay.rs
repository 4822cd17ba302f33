//! A bounded memory of request ids seen recently, so that a token is accepted at most once.
//!
//! Entries are kept until the token they came from has expired (plus clock skew); after that the
//! token itself is refused as expired, so forgetting the id is safe. When the cache is full of
//! live entries it refuses new tokens rather than forget one early: failing closed is the only
//! answer that keeps the replay guarantee.
//!
//! Ids are forgotten in order of expiry, not of arrival. Tokens are minted with one lifetime,
//! so the two orders are usually the same, but not once the wall clock has stepped back: the
//! ids seen before the step then expire long after the ones seen since, and a cache that
//! forgot only from the oldest arrival would keep every later id behind them until the step
//! was made up, fill, and refuse every token as `overloaded` meanwhile.

use super::TokenError;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

/// Request ids and their expiry, bounded in entries.
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashSet<u128>,
    /// (forget-after in Unix ms, id), soonest first.
    order: BinaryHeap<Reverse<(u64, u128)>>,
    capacity: usize,
}

impl ReplayCache {
    /// An empty cache that holds at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            seen: HashSet::new(),
            order: BinaryHeap::new(),
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
        self.order.push(Reverse((forget_after_ms, id)));
        Ok(())
    }

    fn prune(&mut self, now_ms: u64) {
        while let Some(&Reverse((until, id))) = self.order.peek() {
            if until >= now_ms {
                break;
            }
            self.order.pop();
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

    /// 100 tokens a second, each valid for 6 s, and the wall clock steps back 10 minutes.
    #[test]
    fn a_clock_stepping_back_does_not_fill_the_cache() {
        const LIFE: u64 = 6_000;
        let mut c = ReplayCache::new(2_000);
        let mut id = 0u128;
        let mut now = 1_000_000_000u64;
        for _ in 0..600 {
            id += 1;
            c.insert(id, now + LIFE, now).unwrap();
            now += 10;
        }
        now -= 600_000;
        for _ in 0..6_000 {
            id += 1;
            c.insert(id, now + LIFE, now)
                .unwrap_or_else(|e| panic!("token {id} refused: {e:?} ({} ids held)", c.len()));
            now += 10;
        }
        // The ids from before the step are kept until they expire by the clock as it reads.
        assert_eq!(c.insert(1, now + LIFE, now), Err(TokenError::Replayed));
        assert!(c.len() <= 1_202, "{} ids held", c.len());
    }
}
