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
//!
//! The ids are spread over `PARTS` (256) parts, each a set and an expiry queue of its own,
//! so that no insertion has to move more than a part's share of them. A worker answering
//! 100k requests a second holds 600k ids at the default lifetime and skew; kept in one set,
//! they were all rehashed into a table twice the size each time it filled, on the thread
//! that answers every request, which waited milliseconds for it.

use super::TokenError;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

/// How many parts the ids are spread over.
const PARTS: usize = 256;

/// A part keeps spare room for this many ids at most once it is a quarter full.
const KEEP_SPARE: usize = 64;

/// Request ids and their expiry, bounded in entries.
#[derive(Debug)]
pub struct ReplayCache {
    parts: Box<[Part]>,
    /// Ids held in all parts, expired ones not yet forgotten included.
    len: usize,
    capacity: usize,
    /// The part each insertion sweeps besides its own, in turn: an expired id is forgotten
    /// within `PARTS` insertions, however the ids fall.
    sweep: usize,
}

#[derive(Debug, Default)]
struct Part {
    seen: HashSet<u128>,
    /// (forget-after in Unix ms, id), soonest first.
    order: BinaryHeap<Reverse<(u64, u128)>>,
}

impl Part {
    /// Forgets the ids due before `now_ms`; returns how many.
    fn prune(&mut self, now_ms: u64) -> usize {
        let mut forgotten = 0;
        while let Some(&Reverse((until, id))) = self.order.peek() {
            if until >= now_ms {
                break;
            }
            self.order.pop();
            self.seen.remove(&id);
            forgotten += 1;
        }
        if forgotten > 0
            && self.order.capacity() > KEEP_SPARE
            && self.order.len() < self.order.capacity() / 4
        {
            self.order.shrink_to(self.order.len() * 2);
            self.seen.shrink_to(self.seen.len() * 2);
        }
        forgotten
    }
}

impl ReplayCache {
    /// An empty cache that holds at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            parts: (0..PARTS).map(|_| Part::default()).collect(),
            len: 0,
            capacity: capacity.max(1),
            sweep: 0,
        }
    }

    /// Number of ids remembered (some may have expired and not been forgotten yet).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records `id` until `forget_after_ms`; refuses an id already present.
    pub fn insert(
        &mut self,
        id: u128,
        forget_after_ms: u64,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        // The dispatcher's ids are the output of a block cipher: any of their bits spread them.
        // A peer that chose them could at worst put them all in one part, which is then as slow
        // to grow as the one set was, no worse.
        let at = ((id as u64) ^ ((id >> 64) as u64)) as usize % PARTS;
        self.sweep = (self.sweep + 1) % PARTS;
        self.len -= self.parts[self.sweep].prune(now_ms);
        self.len -= self.parts[at].prune(now_ms);
        if self.len >= self.capacity {
            // Other parts may hold ids that have expired since they were last touched.
            for part in self.parts.iter_mut() {
                self.len -= part.prune(now_ms);
            }
        }
        let part = &mut self.parts[at];
        if self.len >= self.capacity {
            return Err(if part.seen.contains(&id) {
                TokenError::Replayed
            } else {
                TokenError::ReplayCacheFull
            });
        }
        // One look-up on the common path: `insert` says whether the id was there.
        if !part.seen.insert(id) {
            return Err(TokenError::Replayed);
        }
        part.order.push(Reverse((forget_after_ms, id)));
        self.len += 1;
        Ok(())
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
        // An expired id is forgotten within PARTS insertions.
        assert!(c.len() <= 11 + PARTS, "{} ids held", c.len());
        let held: usize = c.parts.iter().map(|p| p.order.capacity()).sum();
        assert!(held < 4096, "room for {held} ids kept");
    }

    /// A worker at 100k requests a second holds 600k ids. Growing one table to that size
    /// moved every id held, on the thread that answers requests, each time the table doubled.
    #[test]
    fn no_insertion_has_to_move_more_than_a_part_of_the_ids() {
        const HELD: u128 = 600_000;
        let mut c = ReplayCache::new(1 << 20);
        for id in 0..HELD {
            c.insert(
                id.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
                10_000,
                0,
            )
            .unwrap();
        }
        assert_eq!(c.len(), HELD as usize);
        // What an insertion may have had to move: the largest part's set or queue (nothing
        // expired, so nothing has shrunk).
        let largest = c
            .parts
            .iter()
            .fold(0, |m, p| m.max(p.seen.capacity()).max(p.order.capacity()));
        assert!(
            largest <= HELD as usize / 32,
            "a part has room for {largest} of the {HELD} ids"
        );
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
        assert!(c.len() <= 1_202 + PARTS, "{} ids held", c.len());
    }
}
