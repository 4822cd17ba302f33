//! At most one log line a second about events a peer can cause at will (refused handshakes,
//! connections over a limit, requests refused `overloaded`), each line saying how many there
//! were: a peer must not be able to write a log line per connection or request.

use std::time::{Duration, Instant};

/// Counts events and lets one log line through per second.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// Events since the last line.
    since: u64,
    /// When the last line was let through.
    last: Option<Instant>,
}

impl Throttle {
    /// Counts one event. `Some(n)` when a line is due (the first event, or the first a second or
    /// more after the last line), `n` counting this event and those since the last line.
    pub(crate) fn hit(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// A [`Throttle`] shared by tasks: one per listener, identity or worker, so that a peer
/// cannot multiply the lines by opening more connections.
#[derive(Debug, Default)]
pub(crate) struct SharedThrottle(std::sync::Mutex<Throttle>);

impl SharedThrottle {
    /// As [`Throttle::hit`].
    pub(crate) fn hit(&self) -> Option<u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).hit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_and_the_next_within_a_second_are_counted() {
        let mut t = Throttle::default();
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        // As if a second had passed since the last line: the two held back are counted too.
        t.last = Instant::now().checked_sub(Duration::from_secs(1));
        assert_eq!(t.hit(), Some(3));
        assert_eq!(t.hit(), None);
    }
}
