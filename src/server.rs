//! The accept loop every listener shares: connection limits, the TLS handshake under its
//! deadline, one task per connection inside a tracing span, and shutdown.
//!
//! A connection is counted from the moment TCP accepts it (so half-open handshakes count
//! against `max_connections`), and again per verified peer identity after the handshake
//! (`max_connections_per_identity`). At the total limit the oldest connection still in its
//! handshake, from whatever address, gives its slot to the new one; with none in their
//! handshake the new TCP connection is closed at once, before any TLS work. An address with
//! `max_handshakes_per_address` connections in their handshake likewise gives its oldest
//! one's place to its new one (and that frees the slot the new one needs); while an eighth as
//! many of its connections are still closing so, its new ones are closed at once. Over the
//! per-identity limit the peer gets an `overloaded` error frame.
//! Components supply a [`ConnectionHandler`] that sees a framed connection and an identity,
//! never a raw socket.

use crate::connection::{Connection, IoLimits};
use crate::identity::SpiffeId;
use crate::message::{ErrorCode, Message};
use crate::throttle::{SharedThrottle, Throttle};
use crate::tls::{Acceptor, HandshakeError, ServerStream};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// How long a new connection waits for the slot of the handshake evicted for it.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// How long a handshake under way when the component begins to stop may still take to
/// finish (see `handle_one`).
const HANDSHAKE_AT_STOP: Duration = Duration::from_secs(1);

/// Bounds on a listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections held at once, handshaking or established.
    pub max_connections: usize,
    /// Established connections per peer identity.
    pub max_per_identity: usize,
    /// Connections in their handshake per source address; beyond it the address's oldest
    /// handshake is closed for its new one.
    pub max_handshakes_per_address: usize,
    /// Requests in flight per peer identity, over all its connections.
    pub max_in_flight_per_identity: usize,
    /// Payload bytes in flight per peer identity, over all its connections (unbounded unless
    /// a component sets it).
    pub max_in_flight_bytes_per_identity: usize,
    /// Requests per second per peer identity that may be refused at once (see
    /// [`RefusalPace`]); unpaced unless a component sets it.
    pub refusals_per_sec_per_identity: Option<u32>,
    /// I/O bounds for each connection.
    pub io: IoLimits,
    /// Descriptors the process needs besides its client connections (listener, worker
    /// links, files, a job's pipes): the connection limit is lowered to leave them within the
    /// open-file limit.
    pub other_fds: u64,
}

impl ListenerLimits {
    /// From the `[limits]` section.
    pub fn from_config(l: &crate::config::Limits, max_in_flight_per_identity: usize) -> Self {
        ListenerLimits {
            max_connections: l.max_connections,
            max_per_identity: l.max_connections_per_identity,
            max_handshakes_per_address: l.max_handshakes_per_address.max(1),
            max_in_flight_per_identity: max_in_flight_per_identity.max(1),
            max_in_flight_bytes_per_identity: usize::MAX,
            refusals_per_sec_per_identity: None,
            io: l.io(),
            other_fds: FD_RESERVE,
        }
    }
}

/// A peer that passed the handshake, as handed to a component.
pub struct Peer {
    /// Its verified identity.
    pub id: SpiffeId,
    /// Its socket address (for logs).
    pub addr: SocketAddr,
    /// Request slots shared by every connection of this identity, so that one identity
    /// cannot take all of the capacity.
    pub identity_slots: IdentitySlots,
    /// Where requests that outlive the connection run on (see [`crate::session::Leftovers`]).
    pub leftovers: crate::session::Leftovers,
}

/// Request slots shared by all connections of one identity.
#[derive(Clone)]
pub struct IdentitySlots {
    /// The slots.
    pub slots: Arc<Semaphore>,
    /// Their number.
    pub limit: usize,
    /// Payload budget, one permit per started KiB of a request's payload, held from its
    /// admission until its answer is written.
    pub kib: Arc<Semaphore>,
    /// Its size in KiB.
    pub kib_limit: usize,
    /// A budget of the same size for frames being received in part (see
    /// [`Connection::set_frame_budget`]): kept apart from the payload budget so that a request
    /// beyond that one is still read and refused `overloaded`, not left unread.
    pub frames: crate::connection::FrameBudget,
    /// A budget of the same size for the payloads of 1 KiB or more waiting in the
    /// dispatcher's queues for a worker link, charged until the link writes or drops them.
    /// Kept apart from the payload budget, which a request gives back when it ends: a request
    /// whose deadline passed while its frame was still queued would otherwise leave the frame
    /// there uncounted (one identity with short deadlines queued ~2.4 GB).
    pub queued: Arc<Semaphore>,
    /// A number of this identity's own while the server knows it (never reused): its flow on
    /// the dispatcher's worker links, where identities take turns.
    pub flow: u64,
    /// Its requests refused `overloaded`, logged at most once a second over all its
    /// connections.
    pub(crate) refusals: Arc<SharedThrottle>,
    /// How fast its requests may be refused, over all its connections (none: unpaced).
    pub pace: Option<Arc<RefusalPace>>,
}

/// A client identity's requests refused at once (`denied`, `unknown_op`, `overloaded`, ...),
/// paced over all its connections. A refusal costs far less than serving and still writes
/// an audit line, so one identity pipelining requests it may not make drew 470,000 lines
/// (135 MB) a second. Once the identity owes refusals (beyond a second's worth at once), its
/// connections stop reading until it is back within the pace; requests already read keep
/// running and their answers are written meanwhile.
#[derive(Debug)]
pub struct RefusalPace {
    per_sec: f64,
    /// Refusals that may still come at once (negative: owed), and when that was reckoned.
    state: Mutex<(f64, std::time::Instant)>,
    /// Until when the identity owes (nanoseconds after `epoch`; 0: it owes nothing): what a
    /// connection looks at before each read, without the lock.
    owed_until: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl RefusalPace {
    /// A pace of `per_sec` refusals a second (at least 1).
    pub fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec.max(1));
        let now = std::time::Instant::now();
        RefusalPace {
            per_sec,
            state: Mutex::new((per_sec, now)),
            owed_until: std::sync::atomic::AtomicU64::new(0),
            epoch: now,
        }
    }

    /// Whether a second's worth of refusals may come at once again, as for an identity not
    /// seen before: until then the identity is remembered with its pace, so that closing its
    /// connections and opening new ones does not start it afresh.
    fn rested(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, since) = *state;
        tokens + since.elapsed().as_secs_f64() * self.per_sec >= self.per_sec
    }

    /// Counts `n` refusals. If the identity now owes, its connections read nothing more
    /// until it has paid back ([`RefusalPace::owed_until`]).
    pub fn charge(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, since) = &mut *state;
        let now = std::time::Instant::now();
        let refilled = now.duration_since(*since).as_secs_f64() * self.per_sec;
        *since = now;
        *tokens = (*tokens + refilled).min(self.per_sec) - n as f64;
        if *tokens < 0.0 {
            let until = now + Duration::from_secs_f64(-*tokens / self.per_sec);
            let ns = until.duration_since(self.epoch).as_nanos().max(1);
            self.owed_until.store(
                u64::try_from(ns).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Until when the identity's connections must not read, if it owes now: one atomic load
    /// when it does not.
    pub fn owed_until(&self) -> Option<std::time::Instant> {
        let ns = self.owed_until.load(std::sync::atomic::Ordering::Relaxed);
        if ns == 0 {
            return None;
        }
        let until = self.epoch + Duration::from_nanos(ns);
        if until <= std::time::Instant::now() {
            let _ = self.owed_until.compare_exchange(
                ns,
                0,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
            return None;
        }
        Some(until)
    }
}

/// The next [`IdentitySlots::flow`]; 0 is no identity's (a ping's).
static NEXT_FLOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl IdentitySlots {
    /// Whether anything still holds this identity's slots or budgets: a request running
    /// (even after its connection closed), or a frame of its waiting for a worker link. Its
    /// entry is kept until nothing does, so that reconnecting never gets fresh ones.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.slots) > 1
            || Arc::strong_count(&self.queued) > 1
            || self.pace.as_ref().is_some_and(|p| !p.rested())
    }

    /// `requests` slots and a payload budget of `bytes`, rounded up to KiB as payloads are, so
    /// that a budget of at least the largest payload always admits it alone (capped at what a
    /// semaphore holds: in effect unbounded).
    pub fn new(requests: usize, bytes: usize) -> Self {
        let kib_limit = bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        IdentitySlots {
            slots: Arc::new(Semaphore::new(requests)),
            limit: requests,
            kib: Arc::new(Semaphore::new(kib_limit)),
            kib_limit,
            frames: crate::connection::FrameBudget::new(kib_limit),
            queued: Arc::new(Semaphore::new(kib_limit)),
            flow: NEXT_FLOW.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            refusals: Arc::default(),
            pace: None,
        }
    }
}

/// What a component does with an accepted, authorised connection.
pub trait ConnectionHandler: Clone + Send + Sync + 'static {
    /// Serves one connection until it ends or `shutdown` fires (then drains and returns).
    fn serve(
        &self,
        conn: Connection<ServerStream>,
        peer: Peer,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

/// Counts established connections per identity and holds each identity's request slots.
/// An entry lives as long as the identity has a connection or a request still running: a
/// request that outlives its connection keeps its slot (see [`crate::session`]), and a new
/// connection must find those slots taken, not a fresh set.
#[derive(Default)]
struct IdentityCounts {
    counts: Mutex<HashMap<String, (usize, IdentitySlots)>>,
}

/// Releases an identity's slot when its connection ends.
struct IdentitySlot {
    counts: Arc<IdentityCounts>,
    key: String,
}

impl IdentityCounts {
    fn try_take(
        self: &Arc<Self>,
        id: &SpiffeId,
        max: usize,
        in_flight: usize,
        bytes: usize,
        refusals_per_sec: Option<u32>,
    ) -> Option<(IdentitySlot, IdentitySlots)> {
        let key = id.to_string();
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) {
            // Forget identities with neither connections nor running requests.
            map.retain(|_, (n, s)| *n > 0 || s.in_use());
        }
        let (n, slots) = map.entry(key.clone()).or_insert_with(|| {
            let mut slots = IdentitySlots::new(in_flight, bytes);
            slots.pace = refusals_per_sec.map(|r| Arc::new(RefusalPace::new(r)));
            (0, slots)
        });
        if *n >= max {
            return None;
        }
        *n += 1;
        let slots = slots.clone();
        Some((
            IdentitySlot {
                counts: self.clone(),
                key,
            },
            slots,
        ))
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut map = self.counts.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, slots)) = map.get_mut(&self.key) {
            *n -= 1;
            // Requests still running hold the slots, and queued frames the queue budget (each
            // permit keeps its semaphore alive).
            if *n == 0 && !slots.in_use() {
                map.remove(&self.key);
            }
        }
    }
}

/// The address a handshake counts against: an IPv4 address (also when mapped into IPv6), or
/// the /64 of an IPv6 one, since one host is commonly given a whole /64 and could otherwise
/// take a fresh address for every connection.
fn handshake_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// Connections in their handshake, per source address (see [`handshake_key`]), and the
/// listener's log of refused handshakes.
#[derive(Default)]
struct Handshaking {
    /// Every connection still in its handshake, oldest first (see [`Self::evict_oldest`]),
    /// and the places each address holds.
    pending: Mutex<Pending>,
    refusals: RefusalLog,
    /// Connections refused for their identity's connection limit.
    over_identity_limit: SharedThrottle,
}

/// Connections in their handshake by age, each with the token that makes it give up, and the
/// places of each address (one lock for both, so that a place and its eviction are counted
/// together).
#[derive(Default)]
struct Pending {
    next: u64,
    by_age: std::collections::BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_address: HashMap<IpAddr, Places>,
    /// The connections told to give their place up to a newer one from their own address,
    /// whose tasks have not run yet.
    closing: std::collections::HashSet<u64>,
}

/// The places an address holds: its connections in their handshake, including those told to
/// give theirs up whose tasks have not run yet, which still hold their sockets and connection
/// slots; and how many of those were told so for a newer one from this address by
/// [`Handshaking::try_take`] (not those closed at the listener's total limit, for which the
/// accept loop waits up to `EVICTION_WAIT` each: the bound of `eviction_allowance` holds
/// without them).
#[derive(Default, Debug, PartialEq)]
struct Places {
    held: usize,
    closing: usize,
}

/// How many of an address's connections may be closing for its newer ones at once (evicted,
/// their tasks not yet run), beyond the address's `max` handshakes: an eighth of them, at
/// least 1. Past it, a new connection from that address is closed at once, before any TLS
/// work. Without it, a host opening connections faster than the runtime got to the evicted
/// ones took a new slot for each, and held every slot of the listener from one address
/// (found by a hostile test: all 4096, other addresses' handshakes closed for its new ones).
fn eviction_allowance(max: usize) -> usize {
    (max / 8).max(1)
}

/// Refused handshakes, logged at `info` at most once a second per listener, with how many
/// there were since the last such line; the others at `debug`. Anyone who can reach the port
/// can make a handshake fail, and must not be able to write a log line per connection.
#[derive(Default)]
struct RefusalLog(SharedThrottle);

impl RefusalLog {
    fn log(&self, e: &HandshakeError) {
        if let HandshakeError::Io(io) = e {
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                debug!(reason = %e, "handshake abandoned by peer");
                return;
            }
        }
        match self.0.hit() {
            Some(refused) => info!(reason = %e, refused, "handshake refused"),
            None => debug!(reason = %e, "handshake refused"),
        }
    }
}

/// One connection's place among its address's handshakes, given back when dropped.
struct HandshakeSlot {
    handshaking: Arc<Handshaking>,
    ip: IpAddr,
    /// Its place in [`Handshaking::pending`].
    seq: u64,
    /// Cancelled if a newer connection needs its connection slot.
    evicted: CancellationToken,
}

impl Handshaking {
    /// A place among `ip`'s handshakes. With `max` of them already, the oldest gives its place
    /// up (`made_room`), or if none can (all of them are ending anyway), or if
    /// [`eviction_allowance`] of them are still closing for newer ones, `None`. A host that
    /// opens connections and never starts TLS on them then only ever closes its own oldest,
    /// or its own new ones: another peer from the same address (on the same machine, behind
    /// the same NAT) still gets in, as long as its handshake finishes before `max` newer
    /// connections come from that address, and its connection does not come while the
    /// process is behind with closing them (then it is closed at once, and a client tries
    /// again; the worker links and the watchdog's heartbeat redial alike).
    fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<(HandshakeSlot, bool)> {
        let ip = handshake_key(ip);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let places = pending.per_address.get(&ip);
        let full = places.is_some_and(|p| p.held >= max);
        if full {
            // Too many of its connections are closing already (see `eviction_allowance`).
            if places.is_some_and(|p| p.closing >= eviction_allowance(max))
                || !pending.evict(Some(ip), None)
            {
                return None;
            }
        }
        // The evicted one is counted until its task has run and given its place back.
        pending.per_address.entry(ip).or_default().held += 1;
        let evicted = CancellationToken::new();
        let seq = pending.next;
        pending.next += 1;
        pending.by_age.insert(seq, (ip, evicted.clone()));
        let slot = HandshakeSlot {
            handshaking: self.clone(),
            ip,
            seq,
            evicted,
        };
        Some((slot, full))
    }

    /// Every connection slot is taken: the oldest connection still in its handshake (other
    /// than `keep`, the one asking) gives its slot up. Connections in their handshake are the
    /// only ones not yet authenticated, so connections that never finish theirs, however many
    /// addresses they come from, cannot keep authenticated peers out; and a genuine handshake,
    /// which finishes in a round trip or two, is closed only once every handshake older than
    /// it has been: after at most `max_connections`, less the established connections, newer
    /// ones. The price: a flood from enough addresses to fill the slots (8 at the defaults;
    /// 8 IPv6 /64s) closes any handshake slower than the time those addresses take to open
    /// that many connections; a lone slow handshake is not spared. The oldest of the address
    /// with the most handshakes used to go first, which spared it, but then a peer that opened
    /// a few connections from a neighbour's address (another process on 127.0.0.1) and filled
    /// the rest from other addresses, one each, had every new connection close that
    /// neighbour's handshakes. Returns whether one was told to go.
    fn evict_oldest(&self, keep: u64) -> bool {
        self.evict(None, Some(keep))
    }

    /// Tells the oldest connection in its handshake (from `from`, or from anywhere; never
    /// `keep`) to give its place up. Returns whether there was one.
    fn evict(&self, from: Option<IpAddr>, keep: Option<u64>) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .evict(from, keep)
    }
}

impl Pending {
    /// [`Handshaking::evict`], under the lock.
    fn evict(&mut self, from: Option<IpAddr>, keep: Option<u64>) -> bool {
        let victim = self
            .by_age
            .iter()
            .find(|(seq, (ip, _))| Some(**seq) != keep && from.is_none_or(|f| *ip == f))
            .map(|(seq, _)| *seq);
        match victim.and_then(|seq| self.by_age.remove(&seq).map(|v| (seq, v))) {
            Some((seq, (ip, token))) => {
                if from.is_some() {
                    if let Some(places) = self.per_address.get_mut(&ip) {
                        places.closing += 1;
                        self.closing.insert(seq);
                    }
                }
                token.cancel();
                true
            }
            None => false,
        }
    }
}

impl HandshakeSlot {
    /// Leaves the connections in their handshake; `false` if it was evicted first (its slot
    /// is promised to a newer connection).
    fn finish(&self) -> bool {
        let mut pending = self
            .handshaking
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.by_age.remove(&self.seq).is_some()
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut pending = self
            .handshaking
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.by_age.remove(&self.seq);
        let closing = pending.closing.remove(&self.seq);
        if let Some(places) = pending.per_address.get_mut(&self.ip) {
            places.held -= 1;
            if closing {
                places.closing -= 1;
            }
            if places.held == 0 {
                pending.per_address.remove(&self.ip);
            }
        }
    }
}

/// Runs the accept loop until `shutdown` fires, then gives the open connections `drain` to
/// finish their requests before returning.
///
/// `accepting` (cancelled with `shutdown`, or alone) ends only the accept loop: the open
/// connections are then served as before until their peers close them, or until `shutdown`
/// drains them. A worker whose supervisor is gone stops so: the dispatcher, orphaned at the
/// same moment, still has requests to forward over its links while it drains.
pub async fn serve<H: ConnectionHandler>(
    listener: TcpListener,
    acceptor: Acceptor,
    limits: ListenerLimits,
    handler: H,
    (shutdown, accepting): (CancellationToken, CancellationToken),
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    let leftovers = crate::session::Leftovers::default();
    let max_connections = within_fd_limit(limits.max_connections, limits.other_fds);
    let total = Arc::new(Semaphore::new(max_connections));
    let mut evicted = Throttle::default();
    let per_id = Arc::new(IdentityCounts::default());
    let handshaking = Arc::new(Handshaking::default());
    let mut over_limit = Throttle::default();
    let mut busy_address = Throttle::default();
    let mut address_closing = Throttle::default();
    let mut accept_failed = Throttle::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(failures) = accept_failed.hit() {
                    warn!(error = %e, failures, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((handshake, made_room)) =
            handshaking.try_take(addr.ip(), limits.max_handshakes_per_address)
        else {
            // Its handshakes are all closing, or enough of them that the rest must wait for
            // those to go (`eviction_allowance`): this one is closed at once.
            drop(tcp);
            if let Some(closed) = address_closing.hit() {
                warn!(
                    closed,
                    address = %addr.ip(),
                    counted_as = %handshake_key(addr.ip()),
                    limit = limits.max_handshakes_per_address,
                    "too many handshakes from one address, and its oldest still closing; \
                     closing its new connections at once"
                );
            }
            continue;
        };
        if made_room {
            if let Some(closed) = busy_address.hit() {
                warn!(
                    closed,
                    address = %addr.ip(),
                    counted_as = %handshake_key(addr.ip()),
                    limit = limits.max_handshakes_per_address,
                    "too many handshakes from one address; closing its oldest for its new ones"
                );
            }
        }
        let permit = match total.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            // The address's own oldest, evicted above, frees a slot too: closing another
            // address's handshake as well would let one host cut off others' handshakes
            // whenever established connections fill the other slots.
            Err(_) if made_room || handshaking.evict_oldest(handshake.seq) => {
                if !made_room {
                    if let Some(closed) = evicted.hit() {
                        warn!(
                            closed,
                            limit = max_connections,
                            "connection limit reached; closing the oldest handshakes for new connections"
                        );
                    }
                }
                // The evicted connection's task gives its slot back as soon as it runs.
                tokio::select! {
                    _ = shutdown.cancelled() => None,
                    r = tokio::time::timeout(EVICTION_WAIT, total.clone().acquire_owned()) => {
                        r.ok().and_then(Result::ok)
                    }
                }
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            drop(tcp);
            if let Some(refused) = over_limit.hit() {
                warn!(
                    refused,
                    limit = max_connections,
                    "connection limit reached; closing new connections"
                );
            }
            continue;
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let per_id = per_id.clone();
        let span = info_span!("conn", peer = %addr, id = tracing::field::Empty);
        tracker.spawn(
            handle_one(
                tcp,
                addr,
                acceptor,
                limits,
                handler,
                shutdown,
                per_id,
                permit,
                handshake,
                leftovers.clone(),
            )
            .instrument(span),
        );
    }
    // Nothing more is accepted: free the port now rather than after the drain, so that a
    // successor (a restarted watchdog's new component) can bind it while this one finishes.
    drop(listener);
    tracker.close();
    if !shutdown.is_cancelled() {
        info!(
            connections = tracker.len(),
            "accepting no more connections; serving the open ones until they close"
        );
        tokio::select! {
            () = tracker.wait() => {}
            () = shutdown.cancelled() => {}
        }
    }
    // Each connection drains for `drain` itself; a little slack for the goodbye. Requests
    // whose connection has already ended (the peer left) get the same period.
    let until = tokio::time::Instant::now() + drain + Duration::from_millis(200);
    if tokio::time::timeout_at(until, tracker.wait())
        .await
        .is_err()
    {
        warn!("connections still open after the drain period; closing them");
    }
    let running = leftovers.len();
    if running > 0 {
        info!(
            running,
            "waiting for requests whose connection has closed to finish"
        );
    }
    let dropped = leftovers.finish(until).await;
    if dropped > 0 {
        warn!(
            dropped,
            "requests whose connection had closed still running after the drain period; not waited for"
        );
    }
}

/// Descriptors a listener leaves for what is not a client connection by default: the
/// listener itself, log, certificate and configuration files (see
/// [`ListenerLimits::other_fds`]).
pub const FD_RESERVE: u64 = 64;

/// `max_connections`, lowered to what the open-file limit leaves room for (with a warning).
/// Past that limit `accept` fails instead of the connection limit refusing: the oldest
/// handshake is then no longer closed for a new connection, and a flood of connections that
/// never authenticate keeps honest peers waiting in the kernel's queue.
fn within_fd_limit(max_connections: usize, other_fds: u64) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let room = usize::try_from(soft.saturating_sub(other_fds))
        .unwrap_or(usize::MAX)
        .max(8);
    if room >= max_connections {
        return max_connections;
    }
    warn!(
        open_file_limit = soft,
        configured = max_connections,
        connections = room,
        "the open-file limit leaves room for fewer connections than limits.max_connections; \
         raise it (systemd LimitNOFILE=, ulimit -n) or lower the limit"
    );
    room
}

#[allow(clippy::too_many_arguments)]
async fn handle_one<H: ConnectionHandler>(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: Acceptor,
    limits: ListenerLimits,
    handler: H,
    shutdown: CancellationToken,
    per_id: Arc<IdentityCounts>,
    _permit: OwnedSemaphorePermit,
    handshake: HandshakeSlot,
    leftovers: crate::session::Leftovers,
) {
    // A stop lets a handshake under way finish, for a moment: in TLS 1.3 the client's side
    // is done before ours, and it may have sent its requests already. Served as the stop
    // serves every connection, they are answered `shutting_down` (they did not run); cut off,
    // the client saw a reset and could only say they may have run.
    let stopped = async {
        shutdown.cancelled().await;
        tokio::time::sleep(HANDSHAKE_AT_STOP).await;
    };
    let accepted = tokio::select! {
        () = stopped => return,
        _ = handshake.evicted.cancelled() => None,
        r = acceptor.accept(tcp) => Some(r),
    };
    // Evicted, even if the handshake finished at the same moment: a new connection is waiting
    // for this slot. Whichever takes the handshake out of `pending` first, this task or the
    // eviction, decides.
    let Some(accepted) = accepted.filter(|_| handshake.finish()) else {
        debug!("handshake closed for a newer connection");
        return;
    };
    let handshaking = handshake.handshaking.clone();
    drop(handshake);
    let (stream, id) = match accepted {
        Ok(x) => x,
        Err(e) => {
            handshaking.refusals.log(&e);
            return;
        }
    };
    tracing::Span::current().record("id", tracing::field::display(&id));
    let mut conn = Connection::new(stream, limits.io);
    let max_per_identity = if id.role() == crate::identity::Role::Client {
        limits.max_per_identity
    } else {
        limits.max_per_identity.min(MAX_PER_COMPONENT)
    };
    let Some((_slot, identity_slots)) = per_id.try_take(
        &id,
        max_per_identity,
        limits.max_in_flight_per_identity,
        limits.max_in_flight_bytes_per_identity,
        limits.refusals_per_sec_per_identity,
    ) else {
        if let Some(refused) = handshaking.over_identity_limit.hit() {
            warn!(
                refused,
                limit = max_per_identity,
                "per-identity connection limit reached; refusing"
            );
        }
        conn.close(Some(&Message::connection_error(
            ErrorCode::Overloaded,
            format!("too many connections for {id} (limit {max_per_identity})"),
        )))
        .await;
        return;
    };
    // Frames a client sends in part are charged to a budget of its identity, so that its
    // connections cannot pin more memory than that. Components (the dispatcher at a worker)
    // are not: a link waiting for budget would stall every request on it.
    if id.role() == crate::identity::Role::Client {
        conn.set_frame_budget(identity_slots.frames.clone());
    }
    debug!("connection established");
    handler
        .serve(
            conn,
            Peer {
                id,
                addr,
                identity_slots,
                leftovers,
            },
            shutdown,
        )
        .await;
    debug!("connection closed");
}

/// Connections one component's identity (the watchdog's, the dispatcher's at a worker) may
/// hold at a listener, whatever `max_connections_per_identity` allows clients: a component
/// needs one or two (a link, a heartbeat connection, one more across a restart). Their frames
/// are not charged to a budget as a client's are (a link waiting for budget would stall every
/// request on it), so without this bound the holder of such a certificate could pin a
/// frame's worth of memory (1 MiB by default) in each of 2,048 connections.
pub const MAX_PER_COMPONENT: usize = 16;

/// Connections the kernel completes and queues for `accept` before it drops new SYNs
/// (capped by `net.core.somaxconn`). The standard library's and tokio's 128 filled under a
/// flood of connections that the accept loop closes as fast as it can: an honest client's
/// SYN was dropped, and its connect waited 1–3 s for the retransmission.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listener (address reuse, as tokio's `bind` does, and [`LISTEN_BACKLOG`]), with a
/// message that names the address on failure.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second's worth of refusals at once; beyond it the identity owes, and its connections
    /// must not read until it has paid back, however many of them charged.
    #[test]
    fn refusals_beyond_the_pace_are_owed_until_paid_back() {
        let pace = RefusalPace::new(100);
        pace.charge(100);
        assert_eq!(pace.owed_until(), None);
        let t0 = std::time::Instant::now();
        pace.charge(50);
        pace.charge(50);
        let until = pace.owed_until().expect("owes");
        let wait = until.duration_since(t0);
        assert!(
            wait > Duration::from_millis(950) && wait <= Duration::from_millis(1_010),
            "{wait:?}"
        );
        assert!(!pace.rested());
    }

    #[test]
    fn a_budget_of_the_largest_payload_admits_it_alone() {
        // Payloads are counted in started KiB; the budget is rounded up likewise.
        let largest = 1_000_000;
        let slots = IdentitySlots::new(1, largest);
        let need = u32::try_from(largest.div_ceil(1024)).unwrap();
        assert!(slots.kib.try_acquire_many(need).is_ok());
        assert_eq!(IdentitySlots::new(1, 2048).kib_limit, 2);
        assert_eq!(
            IdentitySlots::new(1, usize::MAX).kib_limit,
            usize::MAX.div_ceil(1024)
        );
    }

    /// An identity whose frames still wait for a worker link keeps its entry (its budgets and
    /// its flow) after its last connection closed: reconnecting must not get a fresh queue
    /// budget while the old frames are queued. Found by review.
    #[test]
    fn an_identity_with_queued_frames_is_not_forgotten() {
        let counts = Arc::new(IdentityCounts::default());
        let alice = SpiffeId::new("securesrv", crate::identity::Role::Client, "alice").unwrap();
        let bob = SpiffeId::new("securesrv", crate::identity::Role::Client, "bob").unwrap();
        let take = |id: &SpiffeId| counts.try_take(id, 8, 8, 1 << 20, None).expect("a slot");
        let (conn, slots) = take(&alice);
        let first = slots.flow;
        let queued = slots.queued.clone().try_acquire_many_owned(4).unwrap();
        drop((conn, slots));
        // A new identity's first connection forgets the unused ones; alice's is in use.
        drop(take(&bob));
        let (_conn, slots) = take(&alice);
        assert_eq!(slots.flow, first);
        assert_eq!(slots.queued.available_permits(), 1024 - 4);
        drop((slots, queued));
        drop(_conn);
        let (_conn, slots) = take(&alice);
        assert_ne!(
            slots.flow, first,
            "an identity with nothing in use is forgotten"
        );
    }

    #[test]
    fn handshakes_count_per_ipv4_address_and_per_ipv6_slash_64() {
        let key = |s: &str| handshake_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        let h = Arc::new(Handshaking::default());
        let take = |ip: &str| h.try_take(ip.parse().unwrap(), 2).expect("a place");
        let (a, a_made_room) = take("2001:db8:1:2::1");
        let (b, _) = take("2001:db8:1:2::2");
        assert!(!a_made_room);
        // A third from the same /64 takes the oldest's place.
        let (c, made_room) = take("2001:db8:1:2::3");
        assert!(made_room, "same /64");
        assert!(a.evicted.is_cancelled() && !b.evicted.is_cancelled());
        let (_d, made_room) = take("2001:db8:1:3::1");
        assert!(!made_room, "another /64");
        // While the evicted one has not given its place back (its task has not run), the
        // address may not close another of its handshakes: the new one is refused.
        let refused = |ip: &str| h.try_take(ip.parse().unwrap(), 2).is_none();
        assert!(refused("2001:db8:1:2::4"));
        assert!(!b.evicted.is_cancelled());
        drop(a);
        let (e, made_room) = take("2001:db8:1:2::4");
        assert!(made_room && b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        drop(b);
        let (_f, _) = take("2001:db8:1:2::5");
        assert!(c.evicted.is_cancelled() && !e.evicted.is_cancelled());
        drop(c);
        let (g, made_room) = take("2001:db8:1:2::6");
        assert!(made_room && e.evicted.is_cancelled());
        // With every one of the address's places closing already, there is none.
        assert!(h.evict(None, None) && h.evict(None, None) && h.evict(None, None));
        assert!(g.evicted.is_cancelled());
        assert!(refused("2001:db8:1:2::7"));
        // An evicted handshake that finishes anyway is told it was evicted.
        assert!(!g.finish());
        // Every place given back, nothing left counted.
        drop((_d, e, _f, g));
        let pending = h.pending.lock().unwrap();
        assert!(pending.by_age.is_empty() && pending.per_address.is_empty());
    }

    /// A host that opens connections faster than the runtime gets to the ones evicted for
    /// them (under a flood of handshakes it has many tasks to run) held a new connection
    /// slot for each: all of a listener's, from one address (found by a hostile test). It
    /// now holds at most its `max` handshakes and an eighth more that are closing.
    #[test]
    fn an_address_whose_evicted_handshakes_linger_holds_a_bounded_number_of_places() {
        let h = Arc::new(Handshaking::default());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let max = 64;
        let mut held = Vec::new();
        for _ in 0..10 * max {
            if let Some((slot, _)) = h.try_take(ip, max) {
                held.push(slot);
            }
        }
        assert_eq!(held.len(), max + max / 8);
        let evicted = held.iter().filter(|s| s.evicted.is_cancelled()).count();
        assert_eq!(evicted, max / 8);
        assert_eq!(
            h.pending.lock().unwrap().per_address[&ip],
            Places {
                held: max + max / 8,
                closing: max / 8
            }
        );
        // Another address is not held back.
        assert!(h.try_take("192.0.2.10".parse().unwrap(), max).is_some());
        // Once the evicted ones' tasks have run, the address's new connections get in again,
        // each closing its oldest.
        held.retain(|s| !s.evicted.is_cancelled());
        let (newest, made_room) = h.try_take(ip, max).expect("a place");
        assert!(made_room);
        held.push(newest);
        assert_eq!(held.iter().filter(|s| s.evicted.is_cancelled()).count(), 1);
        drop(held);
        assert!(!h.pending.lock().unwrap().per_address.contains_key(&ip));
    }

    /// An address's handshake closed by `evict_oldest` for another address's new connection
    /// (every slot taken) does not count against the first address's eviction allowance,
    /// which is for its connections closing for its own newer ones: with it counted (in a
    /// first version, found by review), someone else's flood had this address's next
    /// connection closed at once, although it had closed none of its own.
    #[test]
    fn an_eviction_for_another_address_does_not_spend_this_addresss_allowance() {
        let h = Arc::new(Handshaking::default());
        let victim: IpAddr = "192.0.2.1".parse().unwrap();
        let max = 4;
        let mut held: Vec<_> = (0..max)
            .map(|_| h.try_take(victim, max).expect("a place").0)
            .collect();
        // Every connection slot is taken; a connection from another address closes the
        // oldest handshake of all: the victim's.
        let (flood, _) = h.try_take("198.51.100.7".parse().unwrap(), max).unwrap();
        assert!(h.evict_oldest(flood.seq));
        assert!(held[0].evicted.is_cancelled());
        // The victim's next connection: it has closed none of its own for a newer one.
        let next = h.try_take(victim, max);
        assert!(
            next.is_some(),
            "refused: {:?}",
            h.pending.lock().unwrap().per_address[&handshake_key(victim)]
        );
        held.extend(next.map(|(s, _)| s));
        drop((held, flood));
    }
}
