//! The dispatcher's workers: one persistent, multiplexed mTLS link per worker, kept up with
//! backoff, probed with pings, and the choice of the least-loaded available worker.
//!
//! A link carries many requests at once, matched by id. A worker is *available* when its link
//! is up, its last ping was answered in time, it has not said it is stopping (a request
//! answered `shutting_down`) and it has fewer than
//! `dispatcher.max_in_flight_per_worker` requests outstanding. When a link dies, every request
//! on it learns whether its frame had left the dispatcher ([`ForwardError::Lost`]: it may have
//! run) or not ([`ForwardError::NotSent`]: safe to send elsewhere) — the difference decides
//! whether a non-idempotent request may be retried.

use crate::config::Config;
use crate::connection::{Connection, IoLimits};
use crate::frame::{self, Encoded};
use crate::identity::SpiffeId;
use crate::inflight::InFlight;
use crate::message::Bytes;
use crate::message::{ErrorCode, ForwardRef, Message, Ping, Request};
use crate::throttle::SharedThrottle;
use crate::tls::{ClientStream, Connector};
use crate::token::{MintRequest, Minter, TokenError};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// First reconnection delay.
const RECONNECT_INITIAL: Duration = Duration::from_millis(crate::config::RECONNECT_INITIAL_MS);
/// Failed dials in a row from which "cannot reach worker" is a warning (at this one and every
/// power of two after it): the 8th comes after about 5 s of backoff.
const UNREACHABLE_WARN_FROM: u64 = 8;
/// Earlier pings whose pongs are still taken when they come late.
const LATE_PONGS: usize = 16;
/// Why a link ended when the worker sent what it must not.
const PROTOCOL_VIOLATION: &str = "protocol violation";
/// Unanswered pings before a worker counts as unavailable.
const PING_MISSES_UNAVAILABLE: u32 = 2;
/// Unanswered pings before the link is dropped and re-dialled.
const PING_MISSES_RECONNECT: u32 = 5;

/// How a worker answered, as delivered to the waiting request.
#[derive(Debug)]
enum Answer {
    Reply(Bytes),
    Error(ErrorCode, String),
    NotSent,
    Lost,
}

/// Why a forward did not produce the worker's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The request never left the dispatcher; it can go to another worker.
    #[error("worker link closed before the request was sent")]
    NotSent,
    /// The link died after the request was sent; the worker may or may not have run it.
    #[error("worker went away while the request was in progress")]
    Lost,
    /// The deadline passed while waiting for the worker.
    #[error("deadline passed while waiting for the worker")]
    Timeout,
    /// The worker refused the token after it had expired: the worker read the request too
    /// late (it was paused or overloaded). A refused token means the request did not run, so
    /// it can go to another worker.
    #[error("the worker read the request after its token expired")]
    Expired,
    /// The worker answered with an error.
    #[error("{1}")]
    Remote(ErrorCode, String),
    /// A token could not be minted (internal).
    #[error("cannot mint token: {0}")]
    Token(#[from] TokenError),
}

/// One worker as the dispatcher sees it.
pub struct Slot {
    /// Worker number.
    pub id: u32,
    /// The identity it must present.
    pub identity: SpiffeId,
    /// The identity as text, formatted once (audit lines, tokens).
    pub identity_text: Arc<str>,
    /// Where it listens.
    pub addr: SocketAddr,
    link: Mutex<Option<Arc<Link>>>,
    outstanding: AtomicUsize,
    /// Its refusals of our tokens, logged at most once a second: a worker on a stale token
    /// key refuses every request sent to it.
    pub(crate) token_refusals: SharedThrottle,
    /// Requests it read after their tokens expired (it was behind: clients can cause that).
    pub(crate) expired_tokens: SharedThrottle,
    /// Idempotent requests sent elsewhere after its link broke: one per request in flight.
    pub(crate) lost_retries: SharedThrottle,
    /// The generation + 1 of the link on which it refused tokens signed with the current key
    /// (0: none): its tokens are signed with the previous key on that link. A restarted
    /// worker, on a new link, has read the key file again.
    previous_key_on: AtomicU64,
}

impl Slot {
    /// Whether tokens for this worker on `link` are signed with the previous key.
    pub fn on_previous_key(&self, link: &Link) -> bool {
        self.previous_key_on.load(Ordering::Relaxed) == link.generation.wrapping_add(1)
    }

    /// Signs this worker's tokens on `link` with the previous key from now on.
    pub fn use_previous_key(&self, link: &Link) {
        self.previous_key_on
            .store(link.generation.wrapping_add(1), Ordering::Relaxed);
    }

    fn link(&self) -> Option<Arc<Link>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_link(&self, link: Option<Arc<Link>>) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    /// Requests outstanding on this worker.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// A live connection to one worker (opaque outside this module).
pub struct Link {
    tx: mpsc::Sender<Forward>,
    /// Requests sent (or being sent) and not yet answered.
    pending: InFlight<Answer>,
    next_id: AtomicU64,
    /// The worker answers: its first ping was answered, and not two in a row missed since. A
    /// link is not used before its first pong: in TLS 1.3 our side of the handshake ends
    /// before the worker has judged our certificate, and a worker refusing it looked linked,
    /// with nothing outstanding, until its refusal came.
    healthy: AtomicBool,
    /// The worker answered a request on it `shutting_down`: it is stopping, refuses every
    /// request it reads on this link from now on, and closes it once its drain is over.
    /// Requests already on it are still answered, and the worker's next link is used again.
    stopping: AtomicBool,
    /// Which of the pool's links this is: a worker that refused a request on one link (it
    /// was stopping, say) may take it again on the next, once it has restarted.
    generation: u64,
}

/// A frame for a worker's link: a request (or, with id 0, a ping), the client identity it is
/// for (identities take turns on the link, see `connection::write_link`), when the request's
/// deadline passes (the frame is dropped, not written, if still queued then), and the charge
/// of its payload to the identity's queue budget, given back when the link's writer takes the
/// frame for a write (it then holds at most one batch) or drops it.
struct Forward {
    id: u64,
    client: u64,
    deadline: Option<Instant>,
    frame: Encoded,
    _charge: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl crate::connection::Outgoing for Forward {
    fn frame(&self) -> &Encoded {
        &self.frame
    }

    fn id(&self) -> u64 {
        self.id
    }

    fn flow(&self) -> u64 {
        self.client
    }

    fn expires(&self) -> Option<Instant> {
        self.deadline
    }
}

/// Payloads this large are charged to their identity's queue budget while they wait for a
/// worker link (smaller frames are bounded by the link's queue length alone).
const CHARGE_FROM: usize = 1024;

/// A worker's link, as a request that may not go back to it names it: the worker's id and
/// the link's generation.
pub type Excluded = (u32, u64);

impl Link {
    /// Whether requests may be sent on it: the worker answers, and has not said it is
    /// stopping.
    fn usable(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && !self.stopping.load(Ordering::Acquire)
    }

    /// This link, as a request that may not go back to it names it.
    pub fn excluded(&self, slot: &Slot) -> Excluded {
        (slot.id, self.generation)
    }
}

/// A worker picked for one request: counted among its outstanding requests until dropped,
/// which wakes the requests waiting for a worker if it was at its in-flight limit.
pub struct Picked<'a> {
    /// The worker.
    pub slot: Arc<Slot>,
    /// Its link now.
    pub link: Arc<Link>,
    pool: &'a Pool,
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        let before = self.slot.outstanding.fetch_sub(1, Ordering::AcqRel);
        if before >= self.pool.max_in_flight {
            self.pool.changed.notify_waiters();
        }
    }
}

/// All workers, and the token minter for them.
pub struct Pool {
    slots: Vec<Arc<Slot>>,
    changed: Notify,
    minter: Minter,
    max_in_flight: usize,
    rotate: AtomicUsize,
    max_frame: usize,
    /// Links made so far.
    links_made: AtomicU64,
}

impl Pool {
    /// A pool for `workers` (`(id, identity, address)`), minting with `minter`.
    pub fn new(cfg: &Config, workers: Vec<(u32, SpiffeId, SocketAddr)>, minter: Minter) -> Self {
        Pool {
            slots: workers
                .into_iter()
                .map(|(id, identity, addr)| {
                    Arc::new(Slot {
                        id,
                        identity_text: identity.to_string().into(),
                        identity,
                        addr,
                        link: Mutex::new(None),
                        outstanding: AtomicUsize::new(0),
                        token_refusals: SharedThrottle::default(),
                        expired_tokens: SharedThrottle::default(),
                        lost_retries: SharedThrottle::default(),
                        previous_key_on: AtomicU64::new(0),
                    })
                })
                .collect(),
            changed: Notify::new(),
            minter,
            max_in_flight: cfg.dispatcher.max_in_flight_per_worker,
            rotate: AtomicUsize::new(0),
            max_frame: cfg.limits.max_frame_bytes + frame::LINK_HEADROOM,
            links_made: AtomicU64::new(0),
        }
    }

    /// The workers.
    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    /// Whether tokens signed with the previous token key are still accepted (see
    /// [`Slot::use_previous_key`]).
    pub fn previous_key_usable(&self) -> bool {
        self.minter.previous_usable(crate::token::now_ms())
    }

    /// Workers whose link is up and answering, with room or not; a worker that has said it is
    /// stopping counts as down.
    pub fn linked(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.link().is_some_and(|l| l.usable()))
            .count()
    }

    /// Workers available right now.
    pub fn available(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| self.is_available(s).is_some())
            .count()
    }

    fn is_available(&self, slot: &Slot) -> Option<Arc<Link>> {
        let link = slot.link()?;
        (link.usable() && slot.outstanding() < self.max_in_flight).then_some(link)
    }

    /// Whether a worker not in `exclude` is available now.
    pub fn can_pick(&self, exclude: &[Excluded]) -> bool {
        self.slots.iter().any(|slot| {
            self.is_available(slot)
                .is_some_and(|link| !exclude.contains(&(slot.id, link.generation)))
        })
    }

    /// The available worker with the fewest outstanding requests (ties rotate), skipping the
    /// links in `exclude`, counted as taken. The count is taken only while under the limit: on a
    /// multi-threaded runtime another request may fill the worker between the look and the
    /// count, and then the workers are looked at again.
    pub fn pick(&self, exclude: &[Excluded]) -> Option<Picked<'_>> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        // Each lost race means another request took a place: progress. Bounded all the same;
        // the caller then waits for a change.
        for _ in 0..64 {
            let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n;
            let mut best: Option<(usize, &Arc<Slot>, Arc<Link>)> = None;
            for i in 0..n {
                let slot = &self.slots[(start + i) % n];
                let Some(link) = self.is_available(slot) else {
                    continue;
                };
                if exclude.contains(&(slot.id, link.generation)) {
                    continue;
                }
                let load = slot.outstanding();
                if best.as_ref().is_none_or(|b| load < b.0) {
                    best = Some((load, slot, link));
                }
            }
            let (_, slot, link) = best?;
            let counted = slot
                .outstanding
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_in_flight).then_some(n + 1)
                });
            if counted.is_ok() {
                return Some(Picked {
                    slot: slot.clone(),
                    link,
                    pool: self,
                });
            }
        }
        None
    }

    /// Waits (up to `timeout`) until at least `n` workers are available; true if they are.
    /// A readiness signal for embedding programs and tests.
    pub async fn wait_for_available(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(|available| available >= n, timeout).await
    }

    /// Waits (up to `timeout`) until the number of available workers satisfies `pred`.
    pub async fn wait_until(&self, pred: impl Fn(usize) -> bool, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(self.available()) {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return pred(self.available());
            }
        }
    }

    /// Picks a worker, waiting until `wait_until` for one to become available. It listens
    /// for changes before each look, so that none is missed in between; callers try the
    /// cheaper [`pick`](Self::pick) first, as the dispatcher does.
    pub async fn pick_or_wait(
        &self,
        exclude: &[Excluded],
        wait_until: Instant,
    ) -> Option<Picked<'_>> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.pick(exclude) {
                return Some(p);
            }
            if tokio::time::timeout_at(wait_until, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Sends one request to the `picked` worker with a fresh token and waits for the answer
    /// until `deadline`. `now` is the time the caller read just before (it dates the token's
    /// local expiry estimate; the time left for the worker is read afresh, after minting, so
    /// that it is never more than the dispatcher still waits).
    /// `previous_key`: sign the token with the previous token key (see
    /// [`Slot::use_previous_key`]).
    pub async fn forward(
        &self,
        picked: &Picked<'_>,
        client: &super::Caller,
        req: &Request,
        mut now: Instant,
        deadline: Instant,
        previous_key: bool,
    ) -> Result<Bytes, ForwardError> {
        let (slot, link) = (&*picked.slot, &*picked.link);
        let (op, payload) = (req.op.as_str(), &req.payload);
        // The payload's charge to the identity's queue budget: once that is taken up by
        // frames still queued, the request waits here for room, at most until its deadline
        // (before its token is minted and the worker told the time left).
        let charge = if payload.len() >= CHARGE_FROM {
            let kib = u32::try_from(payload.len().div_ceil(1024)).unwrap_or(u32::MAX);
            let queued = client.queued.clone();
            match queued.clone().try_acquire_many_owned(kib) {
                Ok(p) => Some(p),
                Err(_) => {
                    let waited =
                        tokio::time::timeout_at(deadline, queued.acquire_many_owned(kib)).await;
                    now = Instant::now();
                    match waited {
                        Ok(Ok(p)) => Some(p),
                        Ok(Err(_)) => None,
                        Err(_) => return Err(ForwardError::Timeout),
                    }
                }
            }
        } else {
            None
        };
        let (token, _) = self.minter.mint_with(
            MintRequest {
                audience: &slot.identity,
                client: &client.text,
                op,
                payload,
            },
            crate::token::now_ms(),
            previous_key,
        )?;
        // `None` (a lifetime beyond the clock's range): the token never expires in practice.
        let token_expires = now.checked_add(self.minter.lifetime());
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = frame::encode_spliced(
            &ForwardRef::Forward {
                id,
                op,
                payload,
                token: &token,
                timeout_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX),
            },
            payload,
            self.max_frame,
        )
        .map_err(|e| ForwardError::Remote(ErrorCode::TooLarge, e.to_string()))?;
        let Some(orx) = link.pending.register(id) else {
            return Err(ForwardError::NotSent);
        };
        let forward = Forward {
            id,
            client: client.flow,
            deadline: Some(deadline),
            frame,
            _charge: charge,
        };
        match tokio::time::timeout_at(deadline, link.tx.send(forward)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                link.pending.forget(id);
                return Err(ForwardError::NotSent);
            }
            Err(_) => {
                link.pending.forget(id);
                return Err(ForwardError::Timeout);
            }
        }
        match tokio::time::timeout_at(deadline, orx).await {
            Ok(Ok(Answer::Reply(p))) => Ok(p),
            Ok(Ok(Answer::Error(ErrorCode::InvalidToken, _)))
                if token_expires.is_some_and(|t| Instant::now() >= t) =>
            {
                Err(ForwardError::Expired)
            }
            Ok(Ok(Answer::Error(code, msg))) => Err(ForwardError::Remote(code, msg)),
            Ok(Ok(Answer::NotSent)) => Err(ForwardError::NotSent),
            Ok(Ok(Answer::Lost)) | Ok(Err(_)) => Err(ForwardError::Lost),
            Err(_) => {
                link.pending.forget(id);
                Err(ForwardError::Timeout)
            }
        }
    }

    /// Keeps the link to `slot` up until `shutdown`: dial, serve, and re-dial with backoff.
    pub async fn maintain(
        self: Arc<Self>,
        slot: Arc<Slot>,
        connector: Connector,
        io: IoLimits,
        ping_every: Duration,
        backoff_max: Duration,
        shutdown: CancellationToken,
    ) {
        let mut backoff = RECONNECT_INITIAL;
        let mut failures: u64 = 0;
        // Links in a row that ended before they counted as made (see `made`): only those keep
        // "worker link up" from being logged each time. Failed dials do not: a worker that was
        // down for a while is said to be back, whatever the count of dials it took.
        let mut short_links: u64 = 0;
        while !shutdown.is_cancelled() {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = connector.connect(slot.addr) => r,
            };
            match attempt {
                Ok((stream, _)) => {
                    if short_links == 0 || short_links.is_power_of_two() {
                        info!(worker = slot.id, addr = %slot.addr, after_failures = failures, "worker link up");
                    }
                    let up = tokio::time::Instant::now();
                    let resumed = crate::tls::is_resumed(&stream);
                    let (reason, answered) = self
                        .run_link(&slot, stream, io, ping_every, failures, &shutdown)
                        .await;
                    // A worker refuses a resumed session after the handshake (our certificate
                    // has expired since the ticket was issued, say) with a bare close, and
                    // sends new tickets first: resuming again would meet the same refusal
                    // each time, never saying why. A full handshake gets the alert that does.
                    if resumed && !answered {
                        connector.forget_tickets();
                    }
                    // A link counts as made once the worker has answered on it. In TLS 1.3
                    // our side of the handshake ends before the worker has judged our
                    // certificate: a worker refusing it (an expired certificate, another
                    // trust domain) closed each link at once, and without this the link was
                    // dialled again at once, ~20 times a second, logging each time.
                    // Nor does a link that ended in a protocol violation, or within its first
                    // ping interval: a worker answering the first ping and then breaking the
                    // protocol had itself dialled again at once, 18 times a second.
                    let made =
                        answered && reason != PROTOCOL_VIOLATION && up.elapsed() >= ping_every;
                    if made {
                        info!(worker = slot.id, reason, "worker link down");
                        failures = 0;
                        short_links = 0;
                        backoff = RECONNECT_INITIAL;
                        continue_after_link(&shutdown).await;
                        continue;
                    }
                    failures += 1;
                    short_links += 1;
                    if !answered {
                        if failures == 1 || failures.is_power_of_two() {
                            warn!(worker = slot.id, addr = %slot.addr, attempts = failures, reason, "worker link closed before the worker answered");
                        }
                    } else if failures >= 4 && failures.is_power_of_two() {
                        warn!(worker = slot.id, addr = %slot.addr, attempts = failures, reason, "worker link keeps ending soon after it is made");
                    } else if failures == 1 {
                        info!(
                            worker = slot.id,
                            reason,
                            "worker link ended soon after it was made; dialling again with backoff"
                        );
                    }
                }
                // A worker starting (with the dispatcher, or restarted) is not listening for a
                // moment: said at INFO, and at WARN once it has lasted about 5 s, so that a
                // normal start or restart sets off no alert on WARN lines.
                Err(e) => {
                    failures += 1;
                    // A worker that cannot be reached is a new episode: the link made once it
                    // is back is said, whatever the links before it did.
                    short_links = 0;
                    if failures >= UNREACHABLE_WARN_FROM && failures.is_power_of_two() {
                        warn!(worker = slot.id, addr = %slot.addr, attempts = failures, error = %e, "cannot reach worker");
                    } else if failures == 1 {
                        info!(worker = slot.id, addr = %slot.addr, error = %e, "cannot reach worker yet; dialling again with backoff");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(backoff_max);
        }
    }

    /// Serves one link until it fails; returns why it ended, and whether the worker ever
    /// answered on it. `failures`: the links and dials that failed in a row before it (for
    /// how often to say that a worker never answers).
    async fn run_link(
        &self,
        slot: &Slot,
        stream: ClientStream,
        io: IoLimits,
        ping_every: Duration,
        failures: u64,
        shutdown: &CancellationToken,
    ) -> (&'static str, bool) {
        let (tx, rx) = mpsc::channel(self.max_in_flight + 64);
        let link = Arc::new(Link {
            tx,
            pending: InFlight::default(),
            next_id: AtomicU64::new(1),
            healthy: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            generation: self.links_made.fetch_add(1, Ordering::Relaxed),
        });
        slot.set_link(Some(link.clone()));
        self.changed.notify_waiters();
        // Requests are written by a task of their own while this one reads the answers: see
        // `write_link` for the deadlock that one task doing both would meet.
        let (read_half, write_half) = tokio::io::split(stream);
        let mut conn = Connection::new(read_half, io);
        let stop = shutdown.child_token();
        // Pings skip the queue of requests: their round trip measures the worker, not how
        // much is queued for it.
        let (ping_tx, ping_rx) = mpsc::channel(1);
        let writer = tokio::spawn(crate::connection::write_link(
            Connection::new(write_half, io),
            rx,
            Some(ping_rx),
            {
                let link = link.clone();
                move || link.pending.len() > 1
            },
            stop.clone(),
        ));
        let mut ticker = tokio::time::interval(ping_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let rng = ring::rand::SystemRandom::new();
        let mut awaiting: Option<Vec<u8>> = None;
        // Pings sent before the one awaited, not answered yet: their pongs may come late, and
        // after the awaited one's.
        let mut late: VecDeque<Vec<u8>> = VecDeque::new();
        let mut misses = 0u32;
        // The worker stopped and said every forward it read was answered: the others were
        // never read, and may go elsewhere, idempotent or not.
        let mut unread_did_not_run = false;
        // One wait for cancellation for the whole loop, looked at only once it has woken us: a
        // fresh one per turn would join and leave the token's waiter list, and polling one every
        // turn takes two locks, for every message. `stop` ends with the dispatcher's shutdown
        // and with a failed write.
        let mut cancelled = crate::shutdown::cancelled(&stop);
        let mut answered = false;
        // Whether a ping of this link has been answered in time (it is usable from then on).
        let mut pinged_back = false;
        // Whether an answer (a reply, or an error for a request) is one the worker cannot
        // owe: for id 0 or an id not yet given out, or beyond as many answers as ids given
        // out (ids start at 1, and each is answered once; late answers for requests that
        // timed out still fit). Read without end, such answers kept the dispatcher's thread
        // busy.
        let mut answers: u64 = 0;
        let mut stray = |id: u64| {
            answers += 1;
            let given = link.next_id.load(Ordering::Relaxed).saturating_sub(1);
            id == 0 || id > given || answers > given
        };
        let mut reason = loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => break "shutdown",
                // The link counts as made (`answered`) once the worker has answered a
                // request or a ping: not for an id-0 error or a message it must not send,
                // which a worker could repeat on every link to be dialled again at once. A
                // stray answer, or a pong for no ping, is a violation.
                r = conn.read_message() => match r {
                    Ok(Some(Message::Reply(r))) => {
                        if stray(r.id) {
                            warn!(worker = slot.id, id = r.id, "worker answered a request it does not owe an answer");
                            break PROTOCOL_VIOLATION;
                        }
                        answered |= link.pending.complete(r.id, Answer::Reply(r.payload));
                    }
                    Ok(Some(Message::Error(e))) if e.id == 0 => {
                        unread_did_not_run = e.code == ErrorCode::ShuttingDown;
                        if unread_did_not_run {
                            info!(worker = slot.id, "worker is stopping; requests it did not read go elsewhere");
                        } else {
                            warn!(worker = slot.id, code = %e.code, message = %crate::identity::quoted(&e.message, 80), "worker closed the link");
                        }
                        break "closed by worker";
                    }
                    Ok(Some(Message::Error(e))) => {
                        if stray(e.id) {
                            warn!(worker = slot.id, id = e.id, "worker answered a request it does not owe an answer");
                            break PROTOCOL_VIOLATION;
                        }
                        if e.code == ErrorCode::ShuttingDown
                            && !link.stopping.swap(true, Ordering::AcqRel)
                        {
                            info!(worker = slot.id, "worker is stopping; no more requests on this link");
                        }
                        answered |= link.pending.complete(e.id, Answer::Error(e.code, e.message));
                    }
                    Ok(Some(Message::Pong(p))) => {
                        if awaiting.as_deref() == Some(&p.nonce[..]) {
                            answered = true;
                            awaiting = None;
                            misses = 0;
                            if !link.healthy.swap(true, Ordering::AcqRel) {
                                if pinged_back {
                                    info!(worker = slot.id, "worker answering again");
                                }
                                self.changed.notify_waiters();
                            }
                            pinged_back = true;
                        } else if let Some(at) = late.iter().position(|n| n[..] == p.nonce[..]) {
                            late.remove(at);
                        } else {
                            warn!(worker = slot.id, "worker sent a pong for no ping");
                            break PROTOCOL_VIOLATION;
                        }
                    }
                    Ok(Some(other)) => {
                        warn!(worker = slot.id, kind = other.kind(), "unexpected message from worker");
                        break PROTOCOL_VIOLATION;
                    }
                    Ok(None) => break "closed",
                    Err(e) => {
                        warn!(worker = slot.id, error = %e, "worker link read failed");
                        break "read failed";
                    }
                },
                _ = ticker.tick() => {
                    if awaiting.is_some() {
                        misses += 1;
                        // A link whose worker has not answered yet was never used: said too, on
                        // the first link of a run of failed ones and then as the redial loop
                        // says its own lines (a worker that takes every link and never answers
                        // would otherwise have it said for each).
                        let first_of_few = (failures + 1).is_power_of_two();
                        if misses == PING_MISSES_UNAVAILABLE
                            && (link.healthy.swap(false, Ordering::AcqRel)
                                || (!pinged_back && first_of_few))
                        {
                            warn!(worker = slot.id, misses, "worker not answering pings; not sending it requests");
                        }
                        if misses >= PING_MISSES_RECONNECT {
                            break "pings unanswered";
                        }
                    }
                    let mut nonce = vec![0u8; 16];
                    if ring::rand::SecureRandom::fill(&rng, &mut nonce).is_err() {
                        break "random generator failed";
                    }
                    let ping = Message::Ping(Ping { nonce: nonce.clone() });
                    let Ok(frame) = frame::encode_spliced(&ping, &Bytes::new(), io.max_frame) else {
                        break "cannot encode a ping";
                    };
                    // Id 0 is no request's. If the last ping has not even been written yet,
                    // this one is skipped, and the last one counts as unanswered meanwhile.
                    let ping = Forward { id: 0, client: 0, deadline: None, frame, _charge: None };
                    match ping_tx.try_send(ping) {
                        Ok(()) => {
                            if let Some(before) = awaiting.replace(nonce) {
                                // Pongs may come out of order (a worker on several threads),
                                // and hardly any later than a few pings: the link is dropped
                                // after PING_MISSES_RECONNECT unanswered in a row.
                                if late.len() >= LATE_PONGS {
                                    late.pop_front();
                                }
                                late.push_back(before);
                            }
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => break "write failed",
                    }
                }
            }
        };
        drop(cancelled);
        stop.cancel();
        slot.set_link(None);
        let (mut rx, held, mut writer) = match writer.await {
            Ok(end) => {
                if end.result.is_err() && !shutdown.is_cancelled() {
                    reason = "write failed";
                }
                (end.rx, end.held, Some(end.conn))
            }
            // The writer panicked: the queue went with it, so nothing counts as never sent.
            Err(_) => (mpsc::channel(1).1, Vec::new(), None),
        };
        // Frames still in the channel never left: those requests may go elsewhere.
        link.pending.close(
            &mut rx,
            held,
            || Answer::NotSent,
            || {
                if unread_did_not_run {
                    Answer::NotSent
                } else {
                    Answer::Lost
                }
            },
        );
        self.changed.notify_waiters();
        if let Some(w) = writer.as_mut() {
            w.close(None).await;
        }
        (reason, answered)
    }
}

/// A link that just went down is re-dialled at once (the worker may have restarted), but
/// never in a tight loop.
async fn continue_after_link(shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(RECONNECT_INITIAL) => {}
    }
}
