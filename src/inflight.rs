//! Requests in flight on one multiplexed connection, matched to their waiters by id.
//!
//! Shared by the client library and the dispatcher's worker links. When the connection ends,
//! every waiter learns whether its frame had left ([`InFlight::close`] drains the outgoing queue
//! to find the ones that never did): a request that never left can always be sent again; one
//! that left may have run, which decides whether a non-idempotent request may be retried.

use crate::connection::Outgoing;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};

/// Waiters by request id; closed (`None`) once the connection has ended.
pub struct InFlight<T> {
    waiters: Mutex<Option<HashMap<u64, oneshot::Sender<T>>>>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            waiters: Mutex::new(Some(HashMap::new())),
        }
    }
}

impl<T> InFlight<T> {
    fn with<R>(&self, f: impl FnOnce(&mut Option<HashMap<u64, oneshot::Sender<T>>>) -> R) -> R {
        f(&mut self.waiters.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Registers request `id`; `None` if the connection has already ended.
    pub fn register(&self, id: u64) -> Option<oneshot::Receiver<T>> {
        self.with(|w| {
            let map = w.as_mut()?;
            let (tx, rx) = oneshot::channel();
            map.insert(id, tx);
            Some(rx)
        })
    }

    /// Delivers the answer to request `id` (ignored if nobody waits for it any more); whether
    /// a waiter was registered.
    pub fn complete(&self, id: u64, answer: T) -> bool {
        match self.with(|w| w.as_mut().and_then(|m| m.remove(&id))) {
            Some(tx) => {
                let _ = tx.send(answer);
                true
            }
            None => false,
        }
    }

    /// Drops the waiter of request `id` (its caller gave up).
    pub fn forget(&self, id: u64) {
        self.with(|w| {
            if let Some(m) = w.as_mut() {
                m.remove(&id);
            }
        });
    }

    /// Requests waiting for an answer.
    pub fn len(&self) -> usize {
        self.with(|w| w.as_ref().map_or(0, HashMap::len))
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection ended: refuses new registrations, finds the frames still queued in `rx`
    /// or `held` by its writer (they never left), and answers every waiter with `not_sent()` or
    /// `lost()`.
    pub fn close<F: Outgoing>(
        &self,
        rx: &mut mpsc::Receiver<F>,
        held: Vec<F>,
        not_sent: impl Fn() -> T,
        lost: impl Fn() -> T,
    ) {
        rx.close();
        let mut unsent: HashSet<u64> = held.iter().map(Outgoing::id).collect();
        while let Ok(f) = rx.try_recv() {
            unsent.insert(f.id());
        }
        let waiters = self.with(Option::take).unwrap_or_default();
        for (id, tx) in waiters {
            let _ = tx.send(if unsent.contains(&id) {
                not_sent()
            } else {
                lost()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Encoded;

    /// A queued frame of request `.0`; never written here.
    struct Q(u64);

    impl Outgoing for Q {
        fn frame(&self) -> &Encoded {
            unreachable!("not written in this test")
        }
        fn id(&self) -> u64 {
            self.0
        }
    }

    #[tokio::test]
    async fn close_tells_unsent_from_lost_and_refuses_new_waiters() {
        let f: InFlight<&str> = InFlight::default();
        let (tx, mut rx) = mpsc::channel::<Q>(8);
        let a = f.register(1).unwrap();
        let b = f.register(2).unwrap();
        let c = f.register(3).unwrap();
        let d = f.register(4).unwrap();
        f.complete(3, "answered");
        tx.send(Q(2)).await.unwrap(); // queued, never written
        assert_eq!(f.len(), 3);
        // Request 4 was taken off the queue by the writer, which held it unwritten.
        f.close(&mut rx, vec![Q(4)], || "not sent", || "lost");
        assert_eq!(a.await.unwrap(), "lost");
        assert_eq!(b.await.unwrap(), "not sent");
        assert_eq!(c.await.unwrap(), "answered");
        assert_eq!(d.await.unwrap(), "not sent");
        assert!(f.register(5).is_none());
        assert!(tx.send(Q(6)).await.is_err());
    }
}
