//! The frames a link's writer holds, one queue per flow, taken in turn.
//!
//! The dispatcher's link to a worker carries the requests of every client. Written in the
//! order they were queued, a 2-byte echo waited behind everything another identity had
//! queued before it: about 0.9 s behind 128 one-MiB echoes (its payload budget), measured
//! with `securesrv bench`. Each client identity is a flow, and the flows with frames waiting
//! take turns by bytes (deficit round robin): at its turn a flow is credited [`QUANTUM`]
//! bytes and sends the frames its credit covers, and a flow whose next frame is larger keeps
//! its credit for its next turn. So a small request waits for about one quantum of every
//! other flow, however large their frames and however much they have queued (with one turn
//! per frame, it waited for one whole frame of each: 20 identities sending 1 MiB frames held
//! a 2-byte echo for 126 ms, median), and each flow still gets its share of the link. Within
//! a flow the order stays as queued.

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
    /// Its length in bytes, which its flow's credit must cover.
    fn size(&self) -> usize {
        self.frame().len()
    }
}

/// Bytes a flow is credited at each of its turns.
pub(super) const QUANTUM: usize = 64 * 1024;

/// Emptied queues kept for reuse, at most this many, each of at most [`SPARE_CAPACITY`].
const SPARES: usize = 4;
const SPARE_CAPACITY: usize = 64;

/// A flow with frames waiting.
struct Flow<T> {
    id: u64,
    queue: VecDeque<T>,
    /// Bytes it may still send (deficit round robin).
    credit: usize,
    /// Whether its turn has begun (it was credited and may send what the credit covers).
    on_turn: bool,
}

/// Frames waiting to be written, one FIFO queue per flow.
pub(super) struct Flows<T> {
    /// The flows with frames waiting, the one whose turn it is (or is next) first.
    turns: VecDeque<Flow<T>>,
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
        if let Some(f) = self.turns.iter_mut().rev().find(|f| f.id == flow) {
            f.queue.push_back(item);
            return;
        }
        let mut queue = self.spare.pop().unwrap_or_default();
        queue.push_back(item);
        self.turns.push_back(Flow {
            id: flow,
            queue,
            credit: 0,
            on_turn: false,
        });
    }

    /// The next frame to write.
    #[cfg(test)]
    pub(super) fn pop(&mut self) -> Option<T> {
        self.pop_live(|_| true)
    }

    /// The next frame to write: the next of the flow whose turn it is, if its credit covers
    /// it; else that flow's turn ends, keeping its credit, and the next flow's begins. The
    /// frames for which `live` is false that come first in a flow are dropped when its turn
    /// comes (dropping costs the link nothing); a flow left with none forgets its credit.
    pub(super) fn pop_live(&mut self, mut live: impl FnMut(&T) -> bool) -> Option<T> {
        loop {
            let flow = self.turns.front_mut()?;
            while let Some(head) = flow.queue.front() {
                if live(head) {
                    break;
                }
                flow.queue.pop_front();
                self.len -= 1;
            }
            let Some(size) = flow.queue.front().map(Outgoing::size) else {
                self.retire_front();
                continue;
            };
            if !flow.on_turn {
                flow.on_turn = true;
                flow.credit = flow.credit.saturating_add(QUANTUM);
            }
            if size <= flow.credit {
                flow.credit -= size;
                let item = flow.queue.pop_front();
                self.len -= 1;
                if flow.queue.is_empty() {
                    self.retire_front();
                }
                return item;
            }
            // Its turn is over; the credit waits for the next.
            flow.on_turn = false;
            self.turns.rotate_left(1);
        }
    }

    /// The flow at the front has no frame left: it leaves the turns, and its credit with it.
    fn retire_front(&mut self) {
        if let Some(f) = self.turns.pop_front()
            && self.spare.len() < SPARES
            && f.queue.capacity() <= SPARE_CAPACITY
        {
            self.spare.push(f.queue);
        }
    }

    /// Every frame held, in no particular order.
    pub(super) fn into_vec(self) -> Vec<T> {
        self.turns.into_iter().flat_map(|f| f.queue).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `flow` whose id is `id`, of `size` bytes.
    struct F(u64, u64, usize);

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
        fn size(&self) -> usize {
            self.2
        }
    }

    /// A frame that takes a whole turn.
    fn whole(flow: u64, id: u64) -> F {
        F(flow, id, QUANTUM)
    }

    fn drain(flows: &mut Flows<F>) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| flows.pop().map(|f| (f.0, f.1))).collect()
    }

    #[test]
    fn flows_take_turns_and_each_keeps_its_order() {
        let mut flows = Flows::default();
        for id in 1..=4 {
            flows.push(whole(7, id));
        }
        flows.push(whole(9, 10));
        flows.push(whole(8, 20));
        flows.push(whole(9, 11));
        assert_eq!(flows.len(), 7);
        assert_eq!(
            drain(&mut flows),
            [(7, 1), (9, 10), (8, 20), (7, 2), (9, 11), (7, 3), (7, 4)]
        );
        assert!(flows.is_empty());
        assert!(flows.pop().is_none());
    }

    #[test]
    fn a_turn_sends_what_its_credit_covers() {
        let mut flows = Flows::default();
        // Flow 1: three frames of a third of a turn, then one more; flow 2: one frame.
        for id in 1..=4 {
            flows.push(F(1, id, QUANTUM / 3));
        }
        flows.push(F(2, 9, 10));
        assert_eq!(drain(&mut flows), [(1, 1), (1, 2), (1, 3), (2, 9), (1, 4)]);
    }

    /// With one turn per frame, a small request waited for a whole frame of every other flow:
    /// 20 identities sending 1 MiB frames held a 2-byte echo for 126 ms (median). Turns by
    /// bytes let it go first, and the large frames still go out, each in its turn.
    #[test]
    fn a_small_frame_does_not_wait_for_the_large_frames_of_every_other_flow() {
        let mut flows = Flows::default();
        for flow in 1..=20 {
            flows.push(F(flow, flow * 10, 1 << 20));
            flows.push(F(flow, flow * 10 + 1, 1 << 20));
        }
        flows.push(F(99, 990, 2));
        let order = drain(&mut flows);
        assert_eq!(order[0], (99, 990), "{order:?}");
        assert_eq!(order.len(), 41);
        // Each large flow keeps its order.
        for flow in 1..=20 {
            let mine: Vec<u64> = order.iter().filter(|o| o.0 == flow).map(|o| o.1).collect();
            assert_eq!(mine, [flow * 10, flow * 10 + 1]);
        }
    }

    #[test]
    fn a_flow_that_ran_dry_waits_behind_the_others_and_forgets_its_credit() {
        let mut flows = Flows::default();
        flows.push(whole(1, 1));
        flows.push(whole(1, 2));
        flows.push(F(2, 3, 10));
        assert_eq!(flows.pop().map(|f| f.1), Some(1));
        assert_eq!(flows.pop().map(|f| f.1), Some(3));
        // Flow 2 ran dry with credit left; flow 1 still has a frame and goes first.
        flows.push(whole(2, 4));
        flows.push(whole(2, 5));
        assert_eq!(drain(&mut flows), [(1, 2), (2, 4), (2, 5)]);
    }

    #[test]
    fn frames_nobody_waits_for_are_dropped_not_taken() {
        let mut flows = Flows::default();
        for (flow, id) in [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 6)] {
            flows.push(whole(flow, id));
        }
        // Ids 1, 2 (flow 1), 4, 5 (all of flow 2) and 6 are dead.
        let live = |f: &F| f.1 == 3;
        assert_eq!(flows.pop_live(live).map(|f| f.1), Some(3));
        assert_eq!(flows.len(), 3);
        assert!(flows.pop_live(live).is_none());
        assert!(flows.is_empty());
        // Turns go on as before afterwards.
        flows.push(whole(1, 7));
        flows.push(whole(2, 8));
        flows.push(whole(1, 9));
        assert_eq!(drain(&mut flows), [(1, 7), (2, 8), (1, 9)]);
    }

    #[test]
    fn into_vec_gives_back_every_frame_held() {
        let mut flows = Flows::default();
        for (flow, id) in [(1, 1), (2, 2), (1, 3), (3, 4)] {
            flows.push(whole(flow, id));
        }
        flows.pop();
        let mut ids: Vec<u64> = flows.into_vec().into_iter().map(|f| f.1).collect();
        ids.sort_unstable();
        assert_eq!(ids, [2, 3, 4]);
    }
}
