//! The frames a link's writer holds, one queue per flow, taken in turn.
//!
//! The dispatcher's link to a worker carries the requests of every client. Written in the
//! order they were queued, a 2-byte echo waited behind everything another identity had
//! queued before it: about 0.9 s behind 128 one-MiB echoes (its payload budget), measured
//! with `securesrv bench`. Each client identity is a flow; the flows with frames waiting
//! take one frame each in turn, so a request waits for at most one frame of every other
//! flow, however much that flow has queued. Within a flow the order stays as queued.

use crate::frame::Encoded;
use std::collections::VecDeque;
use tokio::time::Instant;

/// What a link's writer writes ([`super::write_link`]).
pub trait Outgoing {
    /// The encoded frame.
    fn frame(&self) -> &Encoded;
    /// The request id the frame carries (0 for none: a ping), which tells the link's
    /// waiters whose frame never left.
    fn id(&self) -> u64;
    /// The flow it belongs to: flows take turns, frames of one flow keep their order.
    fn flow(&self) -> u64 {
        0
    }
    /// When nobody waits for its answer any more: a frame still held then is dropped, not
    /// written.
    fn expires(&self) -> Option<Instant> {
        None
    }
}

/// Emptied queues kept for reuse, at most this many, each of at most [`SPARE_CAPACITY`].
const SPARES: usize = 4;
const SPARE_CAPACITY: usize = 64;

/// Frames waiting to be written, one FIFO queue per flow.
pub(super) struct Flows<T> {
    /// The flows with frames waiting, the one whose turn is next first.
    turns: VecDeque<(u64, VecDeque<T>)>,
    spare: Vec<VecDeque<T>>,
    len: usize,
}

impl<T> Default for Flows<T> {
    fn default() -> Self {
        Self {
            turns: VecDeque::new(),
            spare: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Outgoing> Flows<T> {
    /// Frames held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` behind the frames of its flow; a flow with none waiting takes its turn
    /// after every flow that has.
    pub(super) fn push(&mut self, item: T) {
        let flow = item.flow();
        self.len += 1;
        // From the back: the flow of the last frame is the likeliest.
        if let Some((_, q)) = self.turns.iter_mut().rev().find(|(f, _)| *f == flow) {
            q.push_back(item);
            return;
        }
        let mut q = self.spare.pop().unwrap_or_default();
        q.push_back(item);
        self.turns.push_back((flow, q));
    }

    /// The next frame of the flow whose turn it is; that flow then waits for every other.
    #[cfg(test)]
    pub(super) fn pop(&mut self) -> Option<T> {
        self.pop_live(|_| true)
    }

    /// The next frame of the flow whose turn it is, that flow then waiting for every other;
    /// the frames for which `live` is false that come first in that flow are dropped (all of
    /// them at once: dropping costs the link nothing), and if none is left, the next flow's
    /// turn comes, and so on.
    pub(super) fn pop_live(&mut self, mut live: impl FnMut(&T) -> bool) -> Option<T> {
        while let Some((flow, mut q)) = self.turns.pop_front() {
            let mut found = None;
            while let Some(item) = q.pop_front() {
                self.len -= 1;
                if live(&item) {
                    found = Some(item);
                    break;
                }
            }
            if q.is_empty() {
                if self.spare.len() < SPARES && q.capacity() <= SPARE_CAPACITY {
                    self.spare.push(q);
                }
            } else {
                self.turns.push_back((flow, q));
            }
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Every frame held, in no particular order.
    pub(super) fn into_vec(self) -> Vec<T> {
        self.turns.into_iter().flat_map(|(_, q)| q).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `flow` whose id is `id`.
    struct F(u64, u64);

    impl Outgoing for F {
        fn frame(&self) -> &Encoded {
            unreachable!("not written in these tests")
        }
        fn id(&self) -> u64 {
            self.1
        }
        fn flow(&self) -> u64 {
            self.0
        }
    }

    fn drain(flows: &mut Flows<F>) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| flows.pop().map(|f| (f.0, f.1))).collect()
    }

    #[test]
    fn flows_take_turns_and_each_keeps_its_order() {
        let mut flows = Flows::default();
        for id in 1..=4 {
            flows.push(F(7, id));
        }
        flows.push(F(9, 10));
        flows.push(F(8, 20));
        flows.push(F(9, 11));
        assert_eq!(flows.len(), 7);
        assert_eq!(
            drain(&mut flows),
            [(7, 1), (9, 10), (8, 20), (7, 2), (9, 11), (7, 3), (7, 4)]
        );
        assert!(flows.is_empty());
        assert!(flows.pop().is_none());
    }

    #[test]
    fn a_flow_that_ran_dry_waits_behind_the_others_when_it_comes_back() {
        let mut flows = Flows::default();
        flows.push(F(1, 1));
        flows.push(F(1, 2));
        flows.push(F(2, 3));
        assert_eq!(flows.pop().map(|f| f.1), Some(1));
        assert_eq!(flows.pop().map(|f| f.1), Some(3));
        // Flow 2 ran dry; flow 1 still has a frame and goes first.
        flows.push(F(2, 4));
        assert_eq!(drain(&mut flows), [(1, 2), (2, 4)]);
    }

    #[test]
    fn frames_nobody_waits_for_are_dropped_not_taken() {
        let mut flows = Flows::default();
        for (flow, id) in [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 6)] {
            flows.push(F(flow, id));
        }
        // Ids 1, 2 (flow 1), 4, 5 (all of flow 2) and 6 are dead.
        let live = |f: &F| f.1 == 3;
        assert_eq!(flows.pop_live(live).map(|f| f.1), Some(3));
        assert_eq!(flows.len(), 3);
        assert!(flows.pop_live(live).is_none());
        assert!(flows.is_empty());
        // Turns go on as before afterwards.
        flows.push(F(1, 7));
        flows.push(F(2, 8));
        flows.push(F(1, 9));
        assert_eq!(drain(&mut flows), [(1, 7), (2, 8), (1, 9)]);
    }

    #[test]
    fn into_vec_gives_back_every_frame_held() {
        let mut flows = Flows::default();
        for (flow, id) in [(1, 1), (2, 2), (1, 3), (3, 4)] {
            flows.push(F(flow, id));
        }
        flows.pop();
        let mut ids: Vec<u64> = flows.into_vec().into_iter().map(|f| f.1).collect();
        ids.sort_unstable();
        assert_eq!(ids, [2, 3, 4]);
    }
}
