//! The request loop of a listening component: read messages, run each request, write the
//! answers back in batches, and drain in-flight work on close or shutdown.
//!
//! One task owns the connection and `select!`s between the next incoming frame and finished
//! answers. A request runs either *inline* — as a future polled by the connection's own task
//! (no task to spawn, no channel: the cheapest path for I/O-bound work such as relaying) — or,
//! for work that may need a core of its own on a multi-threaded runtime, in a *spawned* task
//! whose answer comes back over a channel. Answers that are ready together share one TLS record
//! and one system call. Requests beyond the per-connection or per-identity bound are answered
//! `overloaded` at once; the connection and the other requests go on. Handlers see
//! [`Message`]s, never bytes.

use crate::connection::{ConnError, Connection, LINGER};
use crate::message::{ErrorCode, ErrorReply, Message};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Bytes of answers gathered into one write.
const MAX_BATCH: usize = 256 * 1024;

/// How long a stopping connection, its running requests answered, still refuses the requests
/// already on their way (sent before the peer could know) before it closes.
const STRAGGLERS_WINDOW: Duration = Duration::from_millis(100);

/// Pings a connection may have unanswered beyond its request limit before it is cut off.
pub const PING_HEADROOM: usize = 8;

/// Frames answered at once (pings, requests refused) a connection handles in one turn before
/// the others get theirs. One read can bring a thousand such frames, each cheap; a peer
/// pipelining them on many connections made every other connection, and the watchdog's
/// heartbeat, wait for all of theirs: seconds, enough for the watchdog to kill a healthy
/// dispatcher. Requests that start work are not counted: each takes one of the connection's
/// slots, which bound how many a turn can start, and yielding among them cost pipelining
/// clients 7 % of their throughput.
pub const FRAMES_PER_TURN: usize = 32;

/// What the loop does after a message was handled.
#[derive(Debug)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// Answer this at once (refusals that need no work), then keep reading.
    Reply(Message),
    /// Send this (if any) and close the connection.
    Close(Option<Message>),
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Polled by the connection's task.
    Inline,
    /// In its own task, when the runtime has several threads (inline otherwise).
    Task,
}

/// Bounds on the requests of one connection.
#[derive(Clone)]
pub struct RequestLimits {
    /// Requests in flight on this connection.
    pub per_connection: usize,
    /// Slots shared with the peer identity's other connections.
    pub identity: crate::server::IdentitySlots,
    /// How long running requests may take to finish once the connection stops reading.
    pub drain: Duration,
    /// Where the requests still running when the connection ends go on running.
    pub leftovers: Leftovers,
}

/// Requests that outlive their connection: its peer closed it, or its drain ran out. They
/// run on, still holding their identity's slots, and the server gives them its drain period
/// when it stops ([`Leftovers::finish`]) rather than dropping them unseen; a dispatcher's
/// request then still ends with its audit line.
#[derive(Clone, Default)]
pub struct Leftovers {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Leftovers {
    /// Runs `work` to its end, or until [`finish`](Self::finish) gives up on it.
    fn adopt(&self, work: impl Future<Output = ()> + Send + 'static) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let stop = self.stop.clone();
        rt.spawn(self.tracker.track_future(async move {
            tokio::select! {
                _ = work => {}
                _ = stop.cancelled() => {}
            }
        }));
    }

    /// Waits until every leftover request has finished, or until `until`; then stops waiting
    /// and returns how many were still running. Those polled by their connection's task are
    /// dropped (a handler may see the drop: the dispatcher audits it), as are all of them on a
    /// current-thread runtime; those in tasks of their own (a worker's, on a multi-threaded
    /// runtime) run on until the process exits, as after a drain that ran out. Requests left
    /// over later are not waited for.
    pub async fn finish(&self, until: tokio::time::Instant) -> usize {
        self.tracker.close();
        if tokio::time::timeout_at(until, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_millis(100), self.tracker.wait()).await;
        left
    }

    /// Requests running on after their connection ended.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// An answer, with the share of its identity's payload budget it holds until it is written
/// (none for a ping's).
type Done = (Message, Option<OwnedSemaphorePermit>);

type Answer = Pin<Box<dyn Future<Output = Done> + Send>>;

/// A request's place among those running: its identity's request slot, held until its
/// answer exists, and its share of the identity's payload budget, held until that answer is
/// written (as much as the answer's size, if that is more).
pub struct Admission {
    slot: OwnedSemaphorePermit,
    budget: OwnedSemaphorePermit,
    /// The whole budget, in KiB: no answer waits for more.
    most: u32,
}

/// Handle through which a message handler starts requests.
pub struct Session {
    inline: FuturesUnordered<Answer>,
    tx: mpsc::Sender<Done>,
    spawned: TaskTracker,
    max_in_flight: usize,
    identity: crate::server::IdentitySlots,
    multi_thread: bool,
    /// Spawned requests whose answers do not exist yet.
    spawned_working: Arc<AtomicUsize>,
    /// Pings among the futures in `inline`.
    inline_pings: Arc<AtomicUsize>,
    /// The connection is stopping: every new request is refused `shutting_down`.
    stopping: bool,
    /// Where its requests go when the connection ends before they do.
    leftovers: Leftovers,
    /// The payload budget of the answers being written, given back once they are.
    writing: Option<OwnedSemaphorePermit>,
}

/// Counts one item in a gauge until dropped: a spawned request until its answer exists (or
/// its task is dropped unfinished), or a ping run inline until it is answered.
struct Working(Arc<AtomicUsize>);

impl Working {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Working(count.clone())
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Session {
    /// Starts `work` for request `id`, whose payload is `payload_len` bytes; its answer is
    /// written when it is ready ([`Next::Continue`]). If [`Session::admit`] refuses it, the
    /// refusal is the answer instead ([`Next::Reply`]).
    pub fn start<F>(&mut self, id: u64, placement: Placement, payload_len: usize, work: F) -> Next
    where
        F: Future<Output = Message> + Send + 'static,
    {
        match self.admit(id, payload_len) {
            Ok(admission) => self.run_admitted(admission, placement, work),
            Err(refusal) => Next::Reply(refusal),
        }
    }

    /// Whether request `id`, whose payload is `payload_len` bytes, may run now. Refused with
    /// `shutting_down` once the connection is stopping (it was not read, so it did not run),
    /// and with `overloaded` if the connection or the peer's identity already has its limit
    /// of requests in flight, or the identity's payload budget has no room for it. The
    /// refusal is the request's answer, for the handler to send (and record) as it sees fit.
    pub fn admit(&mut self, id: u64, payload_len: usize) -> Result<Admission, Message> {
        if self.stopping {
            return Err(Message::Error(ErrorReply {
                id,
                code: ErrorCode::ShuttingDown,
                message: "shutting down; send it elsewhere".into(),
            }));
        }
        if self.working() >= self.max_in_flight {
            let limit = self.max_in_flight;
            return Err(self.refuse(
                id,
                format!("too many requests in flight on this connection (limit {limit})"),
            ));
        }
        let Ok(permit) = self.identity.slots.clone().try_acquire_owned() else {
            let limit = self.identity.limit;
            return Err(self.refuse(
                id,
                format!("too many requests in flight for this identity (limit {limit})"),
            ));
        };
        let kib = u32::try_from(payload_len.div_ceil(1024)).unwrap_or(u32::MAX);
        let Ok(budget) = self.identity.kib.clone().try_acquire_many_owned(kib) else {
            let limit = self.identity.kib_limit;
            return Err(self.refuse(
                id,
                format!("too many payload bytes in flight for this identity (limit {limit} KiB)"),
            ));
        };
        Ok(Admission {
            slot: permit,
            budget,
            most: u32::try_from(self.identity.kib_limit).unwrap_or(u32::MAX),
        })
    }

    /// The request slots of the peer's identity.
    pub fn identity(&self) -> &crate::server::IdentitySlots {
        &self.identity
    }

    /// Starts `work` for a request [`Session::admit`] let in; its answer is written when it
    /// is ready.
    pub fn run_admitted<F>(&mut self, admission: Admission, placement: Placement, work: F) -> Next
    where
        F: Future<Output = Message> + Send + 'static,
    {
        self.run(placement, Box::pin(hold(admission, work)), true);
        Next::Continue
    }

    /// Answers a ping through the same path as requests: `pong` runs like a request, so a
    /// component whose request machinery is stuck does not answer. A busy component is not a
    /// stuck one, so a ping does not count against the request limits (a refusal would need
    /// id 0, which means the connection is closing, and would make a full worker look dead).
    /// Pings are bounded together with the requests: a peer with requests and pings unanswered
    /// reaching the request limit plus [`PING_HEADROOM`] is cut off (on a full connection, at
    /// the 9th ping). A nonce of the wrong size closes the connection.
    pub fn ping<F>(&mut self, nonce: Vec<u8>, placement: Placement, pong: F) -> Next
    where
        F: FnOnce(Vec<u8>) -> Message + Send + 'static,
    {
        if let Err(m) = check_nonce(&nonce) {
            return Next::Close(Some(m));
        }
        if self.in_flight() >= self.max_in_flight + PING_HEADROOM {
            return Next::Close(Some(Message::connection_error(
                ErrorCode::Overloaded,
                "too many pings unanswered: requests and pings together beyond the connection's limit",
            )));
        }
        if self.spawns(placement) {
            self.run(
                placement,
                Box::pin(async move { (pong(nonce), None) }),
                false,
            );
        } else {
            // Among the requests run inline until it is answered, and not counted as one.
            let pending = Working::enter(&self.inline_pings);
            let answer = async move {
                let m = pong(nonce);
                drop(pending);
                (m, None)
            };
            self.run(placement, Box::pin(answer), false);
        }
        Next::Continue
    }

    fn spawns(&self, placement: Placement) -> bool {
        placement == Placement::Task && self.multi_thread
    }

    /// Runs `work`, counted against the limits if it is a `request` (not a ping).
    fn run(&mut self, placement: Placement, work: Answer, request: bool) {
        if self.spawns(placement) {
            let tx = self.tx.clone();
            let working = request.then(|| Working::enter(&self.spawned_working));
            self.spawned.spawn(async move {
                let answer = work.await;
                drop(working);
                let _ = tx.send(answer).await;
            });
        } else {
            self.inline.push(work);
        }
    }

    /// Requests running now on this connection: counted from their start until their answer
    /// is written or, for a spawned one, its task has ended. What a drain waits for.
    pub fn in_flight(&self) -> usize {
        self.inline.len() + self.spawned.len()
    }

    /// Requests whose answers do not exist yet: what the limits count. A spawned request's
    /// task ends on its own thread a moment after it handed its answer over, and the peer
    /// may have that answer and sent its next request by then; counting the task until it
    /// ended refused that request `overloaded` although the peer kept within the limit.
    /// Pings do not count: a busy component is not a stuck one (see [`Session::ping`]).
    fn working(&self) -> usize {
        let inline_pings = self.inline_pings.load(std::sync::atomic::Ordering::Acquire);
        self.inline.len().saturating_sub(inline_pings)
            + self
                .spawned_working
                .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Once the last running request is answered, the idle timeout counts from then: a
    /// connection is idle when nothing arrives and nothing runs, and a long request must not
    /// leave its client a moment to send the next one.
    fn idle_from_last_answer<S: AsyncRead + Unpin>(&self, conn: &mut Connection<S>) {
        if self.in_flight() == 0 {
            conn.restart_idle_clock();
        }
    }

    /// An `overloaded` answer, with a log line at most once a second per identity.
    fn refuse(&mut self, id: u64, message: String) -> Message {
        if let Some(refused) = self.identity.refusals.hit() {
            warn!(refused, reason = %message, "refusing requests: limit reached");
        }
        Message::Error(ErrorReply {
            id,
            code: ErrorCode::Overloaded,
            message,
        })
    }
}

/// Counts one running request in a component's gauge until dropped, so that a request whose
/// future is dropped part-way is not counted for ever.
pub struct Running<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Running<'a> {
    /// Counts a request in `gauge`.
    pub fn enter(gauge: &'a std::sync::atomic::AtomicU32) -> Self {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Running(gauge)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Keeps the identity's slot taken until the request's answer exists, and hands its payload
/// budget on with the answer: an answer the peer does not read holds memory as its request
/// did, so that one identity's unread answers stay within its budget. An answer larger than
/// its request (a job's output) first gives its request's share back and waits for a share
/// of its own size, holding its slot: the answers that wait are bounded by the identity's
/// slots, and since only the oldest waiter collects what is given back (tokio's semaphore is
/// fair), waiting answers cannot split the budget between them and wait on each other. While
/// one waits, the identity's new requests with a payload are refused `overloaded`.
async fn hold<F: Future<Output = Message>>(admission: Admission, work: F) -> Done {
    let Admission {
        slot,
        mut budget,
        most,
    } = admission;
    let answer = work.await;
    // Whole KiB: an answer under 1 KiB more than its request never waits.
    let need = match &answer {
        Message::Reply(r) => u32::try_from(r.payload.len() / 1024)
            .unwrap_or(u32::MAX)
            .min(most),
        _ => 0,
    };
    if need > u32::try_from(budget.num_permits()).unwrap_or(u32::MAX) {
        let semaphore = budget.semaphore().clone();
        drop(budget);
        match semaphore.acquire_many_owned(need).await {
            Ok(more) => budget = more,
            // Never closed; should it be, the answer goes uncharged rather than unsent.
            Err(_) => return (answer, None),
        }
    }
    drop(slot);
    (answer, Some(budget))
}

/// Queues an answer (one too large to send becomes a `too_large` error for its request) and
/// keeps its payload budget until the write is done.
fn queue_answer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    session: &mut Session,
    (msg, budget): Done,
) {
    if let Some(budget) = budget {
        match session.writing.as_mut() {
            // All of a connection's answers are charged to its peer's identity.
            Some(held) if Arc::ptr_eq(held.semaphore(), budget.semaphore()) => held.merge(budget),
            Some(_) => {}
            None => session.writing = Some(budget),
        }
    }
    if let Err(e) = conn.queue(&msg) {
        let id = match &msg {
            Message::Reply(r) => r.id,
            Message::Error(e) => e.id,
            _ => 0,
        };
        let _ = conn.queue(&Message::Error(ErrorReply {
            id,
            code: ErrorCode::TooLarge,
            message: format!("answer cannot be sent: {e}"),
        }));
    }
}

/// Queues `first` and every other answer that is ready now, then writes them together and
/// gives their payload budget back.
async fn write_answers<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    session: &mut Session,
    rx: &mut mpsc::Receiver<Done>,
    first: Done,
) -> Result<(), ConnError> {
    queue_answer(conn, session, first);
    while conn.queued() < MAX_BATCH {
        // Polling with a no-op waker is fine here: the loop polls `inline` again with the
        // task's real waker right after this write, which sees anything woken meanwhile.
        if let Some(Some(m)) = session.inline.next().now_or_never() {
            queue_answer(conn, session, m);
        } else if let Ok(m) = rx.try_recv() {
            queue_answer(conn, session, m);
        } else {
            break;
        }
    }
    conn.flush().await?;
    session.writing = None;
    Ok(())
}

/// A connection's stream that can be closed with a reset.
pub trait Reset {
    /// Makes the coming close send a TCP reset and drop what is still queued to send.
    fn reset_on_close(&self);
}

impl Reset for crate::tls::ServerStream {
    fn reset_on_close(&self) {
        let _ = self.get_ref().0.tcp().set_zero_linger();
    }
}

/// Gives up on a peer that does not take what it is sent: a plain close would leave the
/// kernel an orphaned socket holding our unsent answers (up to the send buffer, megabytes)
/// until the peer reads them or the kernel gives up on it, long after we have. A peer that
/// reads, but too slowly for the write deadline, is reset too (as nginx's
/// `reset_timedout_connection` does): it loses what the kernel still held for it. Telling it
/// from one that reads nothing would need the kernel's send queue (`SIOCOUTQ`, `TCP_INFO`):
/// a writer is woken only once half of what is queued has gone, so from here a slow reader
/// looks the same as a stalled one.
fn give_up_writing<S: Reset>(conn: &Connection<S>, e: &ConnError) {
    info!(error = %e, "connection lost while writing");
    conn.get_ref().reset_on_close();
}

/// Waits until `until` (a branch taken only when there is one; built lazily, as a disabled
/// branch's future is still made on every turn).
async fn pause(until: Option<std::time::Instant>) {
    if let Some(t) = until {
        tokio::time::sleep_until(t.into()).await;
    }
}

/// Until when this connection must not read: its identity owes refusals (see
/// [`crate::server::RefusalPace`]).
fn paced_until(session: &Session) -> Option<std::time::Instant> {
    session.identity.pace.as_ref().and_then(|p| p.owed_until())
}

/// Drives `conn` until the peer closes, a protocol error, or `shutdown`; then waits up to
/// the drain period for running requests and delivers their answers before closing. A
/// connection whose peer does not take its answers within the write timeout is reset
/// ([`Reset`]).
pub async fn drive<S, F>(
    mut conn: Connection<S>,
    shutdown: CancellationToken,
    limits: RequestLimits,
    mut on_message: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Reset,
    F: FnMut(Message, &mut Session) -> Next,
{
    let max_in_flight = limits.per_connection.max(1);
    let (tx, mut rx) = mpsc::channel::<Done>(max_in_flight + PING_HEADROOM + 8);
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread);
    let mut session = Session {
        inline: FuturesUnordered::new(),
        tx,
        spawned: TaskTracker::new(),
        max_in_flight,
        identity: limits.identity,
        multi_thread,
        spawned_working: Arc::default(),
        inline_pings: Arc::default(),
        stopping: false,
        leftovers: limits.leftovers,
        writing: None,
    };
    let mut last: Option<Message> = None;
    // One wait for cancellation for the whole loop, looked at only once it has woken us: a
    // fresh one per turn would join and leave the token's waiter list, and polling one every
    // turn takes two locks, for every message.
    let mut cancelled = crate::shutdown::cancelled(&shutdown);
    // Frames handled since this task last let the others run (see `FRAMES_PER_TURN`).
    let mut taken = 0;
    loop {
        let paced = paced_until(&session);
        tokio::select! {
            biased;
            _ = &mut cancelled => {
                debug!("shutting down: no new requests on this connection");
                break;
            }
            Some(answer) = session.inline.next(), if !session.inline.is_empty() => {
                if let Err(e) = write_answers(&mut conn, &mut session, &mut rx, answer).await {
                    give_up_writing(&conn, &e);
                    return;
                }
                session.idle_from_last_answer(&mut conn);
            }
            // Only spawned requests answer through the channel, and a current-thread runtime
            // runs every request inline: polling it there would register a waker per turn.
            Some(answer) = rx.recv(), if session.multi_thread => {
                if let Err(e) = write_answers(&mut conn, &mut session, &mut rx, answer).await {
                    give_up_writing(&conn, &e);
                    return;
                }
                session.idle_from_last_answer(&mut conn);
            }
            // The identity owes refusals: read nothing until it is paid back, but go on
            // answering what runs (the other branches). The time not read is ours, not the
            // peer's: its frame and idle clocks start again.
            _ = pause(paced), if paced.is_some() => {
                conn.restart_clocks();
            }
            r = conn.read_message(), if paced.is_none() => {
                // Handle the requests that arrived with this one before writing answers, so
                // that their answers can share a write; refusals made here share one too.
                let mut r = r;
                let mut refused = false;
                let stop = loop {
                    match r {
                        Ok(Some(msg)) => {
                            let ping = matches!(msg, Message::Ping(_));
                            match on_message(msg, &mut session) {
                                // A request that starts work takes a slot, and the slots bound
                                // how many one turn can start; a ping is answered at once.
                                Next::Continue => taken += usize::from(ping),
                                Next::Reply(m) => {
                                    taken += 1;
                                    if let Err(e) = conn.queue(&m) {
                                        give_up_writing(&conn, &e.into());
                                        return;
                                    }
                                    refused = true;
                                    // Beyond its identity's pace, no connection of the
                                    // identity takes another frame until it is back within it
                                    // (the rest stays buffered).
                                    if let Some(pace) = &session.identity.pace {
                                        pace.charge(1);
                                        if pace.owed_until().is_some() {
                                            break None;
                                        }
                                    }
                                }
                                Next::Close(m) => break Some(m),
                            }
                        }
                        Ok(None) => break Some(None),
                        // A peer quiet while its requests run waits for their answers: not
                        // idle. The clock starts again; a request's own deadline bounds it.
                        Err(ConnError::Idle(_)) if session.in_flight() > 0 => {
                            conn.restart_idle_clock();
                            break None;
                        }
                        Err(e) => {
                            log_read_error(&e);
                            break Some(e.to_message());
                        }
                    }
                    if taken >= FRAMES_PER_TURN {
                        break None;
                    }
                    match conn.buffered_message() {
                        Ok(Some(m)) => r = Ok(Some(m)),
                        Ok(None) => break None,
                        Err(e) => r = Err(e),
                    }
                };
                if refused {
                    if let Err(e) = conn.flush().await {
                        give_up_writing(&conn, &e);
                        return;
                    }
                }
                if let Some(m) = stop {
                    last = m;
                    break;
                }
                if taken >= FRAMES_PER_TURN {
                    // More may be buffered, or readable at once: let the other connections
                    // (and the watchdog's ping) have their turn first.
                    tokio::task::yield_now().await;
                    taken = 0;
                }
            }
        }
    }
    session.spawned.close();
    let deadline = tokio::time::Instant::now() + limits.drain;
    // When stopping, the peer is still heard while the running requests finish: a ping is
    // answered (the component is busy, not dead) and a new request gets `shutting_down` at
    // once, so that the peer takes it elsewhere rather than waiting on an unread connection.
    let stopping = last.is_none() && shutdown.is_cancelled();
    session.stopping = true;
    let mut hearing = stopping;
    // After the running requests, requests already on their way are refused too, for a
    // moment; then the connection closes.
    let mut stragglers: Option<tokio::time::Instant> = None;
    // Whether the drain period ran out with requests running (their answers never come).
    let mut timed_out = false;
    loop {
        let running = session.in_flight() > 0 || !rx.is_empty();
        if !running {
            if !hearing {
                break;
            }
            let until = *stragglers.get_or_insert_with(|| {
                deadline.min(tokio::time::Instant::now() + STRAGGLERS_WINDOW)
            });
            if tokio::time::Instant::now() >= until {
                break;
            }
        }
        let paced = paced_until(&session);
        let quiet_until = if running {
            deadline
        } else {
            stragglers.unwrap_or(deadline)
        };
        tokio::select! {
            // Answers first: one ready as the deadline passes is still written. Then the
            // deadline, before reading: a peer that keeps sending must not postpone it.
            biased;
            Some(answer) = session.inline.next(), if !session.inline.is_empty() => {
                if let Err(e) = write_answers(&mut conn, &mut session, &mut rx, answer).await {
                    give_up_writing(&conn, &e);
                    return;
                }
            }
            Some(answer) = rx.recv(), if session.multi_thread => {
                if let Err(e) = write_answers(&mut conn, &mut session, &mut rx, answer).await {
                    give_up_writing(&conn, &e);
                    return;
                }
            }
            _ = tokio::time::sleep_until(quiet_until), if running || stragglers.is_some() => {
                if running {
                    info!(unanswered = session.in_flight(), "drain deadline passed; closing without their answers");
                    timed_out = true;
                    break;
                }
            }
            _ = pause(paced), if hearing && paced.is_some() => {
                conn.restart_clocks();
            }
            r = conn.read_message(), if hearing && paced.is_none() => {
                // The handler sees requests and pings as before; the session now refuses
                // every request `shutting_down`, and the handler answers (and records) that.
                let next = match r {
                    Ok(Some(m @ (Message::Request(_) | Message::Forward(_) | Message::Ping(_)))) => {
                        on_message(m, &mut session)
                    }
                    Ok(Some(_)) | Ok(None) | Err(_) => {
                        hearing = false;
                        Next::Continue
                    }
                };
                match next {
                    Next::Continue => {}
                    Next::Reply(m) => {
                        if let Some(pace) = &session.identity.pace {
                            pace.charge(1);
                        }
                        if let Err(e) = conn.send(&m).await {
                            give_up_writing(&conn, &e);
                            return;
                        }
                    }
                    Next::Close(m) => {
                        hearing = false;
                        last = m;
                    }
                }
            }
        }
    }
    let unanswered = session.in_flight() + rx.len();
    if stopping && last.is_none() {
        last = Some(closing_verdict(timed_out, unanswered));
    } else if !stopping && (timed_out || unanswered > 0) {
        // Closed by the peer (a close_notify, a half-close) or for its fault (a malformed
        // frame, say) with requests still running after the drain: the peer learns that they
        // may have run, as at a stop.
        let note = format!(
            "{} requests still running were not answered and may have run",
            unanswered.max(1)
        );
        match last.as_mut() {
            Some(Message::Error(e)) if e.id == 0 => {
                e.message.push_str("; ");
                e.message.push_str(&note);
            }
            None => {
                last = Some(Message::connection_error(
                    ErrorCode::Timeout,
                    format!("the drain period ended; {note}"),
                ))
            }
            Some(_) => {}
        }
    }
    // Closing and lingering end in time for the component's own wait for its connections
    // (the drain period and a little more) when it stops, so that the process does not exit
    // with a socket still pending.
    let until = if stopping {
        deadline + Duration::from_millis(100)
    } else {
        tokio::time::Instant::now() + conn.limits().write_timeout + LINGER
    };
    // A peer that does not take even the close within the write deadline is reset, as at
    // a failed write (see `give_up_writing`).
    if !conn.close_lingering(last.as_ref(), until).await {
        conn.get_ref().reset_on_close();
    }
}

/// What a stopping connection says as it closes (PROTOCOL.md §5), decided by how its drain
/// ended: `shutting_down` only if it did not run out and nothing is left unanswered (every
/// request it read was answered, so the others were not read and did not run); `timeout`
/// otherwise (those may have run). Not by a count alone: a request that finished after the
/// deadline has an answer that was not written.
fn closing_verdict(timed_out: bool, unanswered: usize) -> Message {
    if !timed_out && unanswered == 0 {
        Message::connection_error(
            ErrorCode::ShuttingDown,
            "shutting down; every request read on this connection was answered, \
             the others were not read",
        )
    } else {
        Message::connection_error(
            ErrorCode::Timeout,
            format!(
                "shutting down; {} requests still running were not answered and may have run",
                unanswered.max(1)
            ),
        )
    }
}

/// Requests still running when their connection ends, however it ends, are run to the end
/// (each has its own deadline) with their answers thrown away, rather than dropped: the work
/// they started elsewhere (a forward a worker is running, a job) goes on either way, and
/// dropping them would free their identity's request slots and the worker's count while it
/// does, so that a peer could reconnect and start more than its limits allow. Spawned requests
/// run on by themselves.
impl Drop for Session {
    fn drop(&mut self) {
        let mut inline = std::mem::take(&mut self.inline);
        if !inline.is_empty() {
            self.leftovers
                .adopt(async move { while inline.next().await.is_some() {} });
        }
        // Spawned requests run on in their own tasks; the server waits for them as well.
        self.spawned.close();
        if !self.spawned.is_empty() {
            let spawned = self.spawned.clone();
            self.leftovers.adopt(async move { spawned.wait().await });
        }
    }
}

fn log_read_error(e: &ConnError) {
    match e {
        ConnError::Idle(_) => debug!(reason = %e, "closing idle connection"),
        ConnError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!("peer closed without close_notify")
        }
        _ => info!(reason = %e, "closing connection"),
    }
}

/// A ping's nonce must be 16 to 64 bytes; anything else closes the connection.
pub fn check_nonce(nonce: &[u8]) -> Result<(), Message> {
    use crate::message::{MAX_NONCE_LEN, MIN_NONCE_LEN};
    if (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(Message::connection_error(
            ErrorCode::BadRequest,
            format!("ping nonce must be {MIN_NONCE_LEN} to {MAX_NONCE_LEN} bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::IoLimits;
    use crate::message::{Bytes, Reply, Request};
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    /// A request for op `x`, with no payload, as the tests' handlers take it.
    fn request(id: u64) -> Message {
        Message::Request(Request {
            id,
            op: "x".into(),
            payload: Bytes::new(),
            timeout_ms: None,
        })
    }

    /// In-memory pipes have no TCP to reset.
    impl Reset for tokio::io::DuplexStream {
        fn reset_on_close(&self) {}
    }

    /// A request spawned on a multi-threaded runtime that finishes right at the drain
    /// deadline: its answer is written, or the connection ends with id-0 `timeout` (may have
    /// run); never id-0 `shutting_down` (did not run) without the answer. Found by review:
    /// the verdict was read from the running count after the loop, when the answer could be
    /// sitting unwritten in the channel (47 of 200 runs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_at_the_drain_deadline_is_never_called_unread() {
        let drain = Duration::from_millis(30);
        let mut wrong = 0;
        for _ in 0..200 {
            let (a, b) = tokio::io::duplex(1 << 16);
            let server = Connection::new(a, IoLimits::default());
            let mut client = Connection::new(b, IoLimits::default());
            let shutdown = CancellationToken::new();
            let cancel_at: Arc<Mutex<Option<Instant>>> = Arc::default();
            let notify = Arc::new(tokio::sync::Notify::new());
            let read = Arc::new(tokio::sync::Notify::new());
            let (at, go, was_read) = (cancel_at.clone(), notify.clone(), read.clone());
            let limits = RequestLimits {
                per_connection: 8,
                identity: crate::server::IdentitySlots::new(8, 1 << 20),
                drain,
                leftovers: Leftovers::default(),
            };
            let srv = tokio::spawn(drive(
                server,
                shutdown.clone(),
                limits,
                move |m, s| match m {
                    Message::Request(q) => {
                        let (at, go) = (at.clone(), go.clone());
                        was_read.notify_one();
                        s.start(q.id, Placement::Task, 0, async move {
                            go.notified().await;
                            let cancelled = *at.lock().unwrap_or_else(|p| p.into_inner());
                            let until = cancelled.unwrap_or_else(Instant::now) + drain;
                            tokio::time::sleep_until(until).await;
                            Message::Reply(Reply {
                                id: q.id,
                                payload: Bytes::from_static(b"ran"),
                            })
                        })
                    }
                    _ => Next::Continue,
                },
            ));
            client.send(&request(1)).await.unwrap();
            // Stopping before the request is read would rightly refuse it `shutting_down`
            // (on a busy machine 5 ms were not always enough for the read).
            tokio::time::timeout(Duration::from_secs(10), read.notified())
                .await
                .expect("the request is read");
            *cancel_at.lock().unwrap() = Some(Instant::now());
            shutdown.cancel();
            notify.notify_one();
            let (mut answered, mut verdict) = (false, None);
            while let Ok(Some(m)) = client.read_message().await {
                match m {
                    Message::Reply(r) if r.id == 1 => answered = true,
                    Message::Error(e) if e.id == 0 => verdict = Some(e.code),
                    _ => {}
                }
            }
            drop(client);
            let _ = srv.await;
            if !answered && verdict == Some(ErrorCode::ShuttingDown) {
                wrong += 1;
            }
        }
        assert_eq!(wrong, 0, "id-0 shutting_down for a request that ran");
    }

    /// A connection closed for a malformed frame, or half-closed by its peer, while a request
    /// runs: the request runs through the drain, and an id-0 error then says it was not
    /// answered and may have run. Found by an independent client: the first said only why the
    /// connection closed, the second nothing at all.
    #[tokio::test]
    async fn a_close_with_requests_left_unanswered_says_they_may_have_run() {
        use tokio::io::AsyncWriteExt;
        for half_close in [false, true] {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let limits = RequestLimits {
                per_connection: 8,
                identity: crate::server::IdentitySlots::new(8, 1 << 20),
                drain: Duration::from_millis(50),
                leftovers: Leftovers::default(),
            };
            let srv = tokio::spawn(drive(
                Connection::new(a, IoLimits::default()),
                CancellationToken::new(),
                limits,
                |m, s| match m {
                    Message::Request(q) => s.start(q.id, Placement::Inline, 0, async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Message::Reply(Reply {
                            id: q.id,
                            payload: Bytes::new(),
                        })
                    }),
                    _ => Next::Continue,
                },
            ));
            let request = request(1);
            let mut bytes = crate::frame::encode_to_vec(&request, 1 << 20).unwrap();
            if !half_close {
                // A one-byte body: MessagePack's reserved marker.
                bytes.extend_from_slice(&[0, 0, 0, 1, 0xc1]);
            }
            b.write_all(&bytes).await.unwrap();
            if half_close {
                b.shutdown().await.unwrap();
            }
            let mut client = Connection::new(b, IoLimits::default());
            let mut closing = None;
            while let Ok(Some(m)) = client.read_message().await {
                match m {
                    Message::Error(e) if e.id == 0 => closing = Some((e.code, e.message)),
                    other => panic!("unexpected {other:?}"),
                }
            }
            let (code, message) = closing.expect("an id-0 error");
            let expected = if half_close {
                ErrorCode::Timeout
            } else {
                ErrorCode::BadRequest
            };
            assert_eq!(code, expected, "{message}");
            assert!(
                message.contains("1 requests still running were not answered and may have run"),
                "{message}"
            );
            drop(client);
            let _ = srv.await;
        }
    }

    #[test]
    fn the_closing_verdict_says_did_not_run_only_when_nothing_is_left() {
        let code = |m: Message| match m {
            Message::Error(e) if e.id == 0 => (e.code, e.message),
            other => panic!("{other:?}"),
        };
        assert_eq!(closing_verdict(false, 0).kind(), "error");
        assert_eq!(code(closing_verdict(false, 0)).0, ErrorCode::ShuttingDown);
        // The drain ran out, even if the count reads 0 now (an answer left unwritten).
        let (c, m) = code(closing_verdict(true, 0));
        assert_eq!(c, ErrorCode::Timeout);
        assert!(m.contains("1 requests"), "{m}");
        // Answers not yet written (running, or waiting in the channel) are counted.
        let (c, m) = code(closing_verdict(false, 3));
        assert_eq!(c, ErrorCode::Timeout);
        assert!(m.contains("3 requests"), "{m}");
    }

    /// A peer that keeps sending requests while the connection drains: each is refused, and
    /// the drain deadline still ends the connection. With the read polled before the
    /// deadline, a flood held it open for as long as it lasted (3.45 s for a 100 ms drain).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_requests_does_not_postpone_the_drain_deadline() {
        let drain = Duration::from_millis(100);
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = Connection::new(a, IoLimits::default());
        let (br, bw) = tokio::io::split(b);
        let mut from_server = Connection::new(br, IoLimits::default());
        let mut to_server = Connection::new(bw, IoLimits::default());
        let shutdown = CancellationToken::new();
        let limits = RequestLimits {
            per_connection: 8,
            identity: crate::server::IdentitySlots::new(8, 1 << 20),
            drain,
            leftovers: Leftovers::default(),
        };
        // Request 1 never ends, so the drain can only end at its deadline.
        let srv = tokio::spawn(drive(server, shutdown.clone(), limits, |m, s| match m {
            Message::Request(q) => s.start(q.id, Placement::Inline, 0, async {
                std::future::pending::<Message>().await
            }),
            _ => Next::Continue,
        }));
        to_server.send(&request(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        shutdown.cancel();
        let cancelled = Instant::now();
        let reader = tokio::spawn(async move {
            let mut verdict = None;
            while let Ok(Some(m)) = from_server.read_message().await {
                if let Message::Error(e) = m {
                    if e.id == 0 {
                        verdict = Some(e.code);
                    }
                }
            }
            verdict
        });
        let flood = tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(3);
            let mut id = 2;
            while Instant::now() < until {
                for _ in 0..64 {
                    let _ = to_server.queue(&request(id));
                    id += 1;
                }
                if to_server.flush().await.is_err() {
                    break;
                }
            }
        });
        let _ = srv.await;
        let took = cancelled.elapsed();
        flood.abort();
        assert!(
            took < Duration::from_millis(1_000),
            "the drain lasted {took:?}"
        );
        assert_eq!(reader.await.unwrap(), Some(ErrorCode::Timeout));
    }

    /// A connection that takes one request at a time and answers requests and pings at once
    /// (from tasks of their own on a multi-threaded runtime): the client's end, the shutdown
    /// token and the server's task.
    fn one_request_at_a_time() -> (
        Connection<tokio::io::DuplexStream>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = Connection::new(a, IoLimits::default());
        let limits = RequestLimits {
            per_connection: 1,
            identity: crate::server::IdentitySlots::new(8, 1 << 20),
            drain: Duration::from_millis(100),
            leftovers: Leftovers::default(),
        };
        let shutdown = CancellationToken::new();
        let srv = tokio::spawn(drive(server, shutdown.clone(), limits, |m, s| match m {
            Message::Request(q) => s.start(q.id, Placement::Task, 0, async move {
                Message::Reply(Reply {
                    id: q.id,
                    payload: Bytes::new(),
                })
            }),
            Message::Ping(p) => s.ping(p.nonce, Placement::Task, |nonce| {
                Message::Pong(crate::message::Pong {
                    nonce,
                    in_flight: 0,
                    workers_available: None,
                })
            }),
            _ => Next::Continue,
        }));
        (Connection::new(b, IoLimits::default()), shutdown, srv)
    }

    /// A spawned request counted against the limit until its task ended, a moment after it
    /// handed its answer over: a peer that had the answer and sent its next request at once
    /// could be refused `overloaded` although it kept within the limit (seen once in CI, in
    /// `a_burst_never_sends_a_worker_more_than_it_runs`, with the machine busy). Here a thread
    /// that spins keeps the runtime's threads from finishing their tasks at once (without the
    /// fix, 23 and 28 of 2,000 requests were refused in two runs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_sent_after_the_last_answer_is_within_the_limit() {
        let (mut client, shutdown, srv) = one_request_at_a_time();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..1)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let mut refused = 0;
        for id in 1..=2_000 {
            let request = request(id);
            client.send(&request).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(5), client.read_message()).await {
                Ok(Ok(Some(Message::Reply(r)))) if r.id == id => {}
                Ok(Ok(Some(Message::Error(e)))) if e.id == id => refused += 1,
                other => panic!("request {id}: {other:?}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in spinners {
            let _ = t.join();
        }
        assert_eq!(refused, 0, "requests refused although one at a time");
        shutdown.cancel();
        let _ = srv.await;
    }

    /// A ping does not count against the request limit: the dispatcher's pings ride in the
    /// same writes as its forwards, and a worker whose limit equals the dispatcher's refused
    /// the forward read with a ping `overloaded` (a review saw 88 in 10 s with 10 ms pings).
    async fn a_ping_read_with_a_request_leaves_room_for_it() {
        let (mut client, shutdown, srv) = one_request_at_a_time();
        for id in 1..=20 {
            let ping = Message::Ping(crate::message::Ping { nonce: vec![7; 16] });
            client.queue(&ping).unwrap();
            client.queue(&request(id)).unwrap();
            client.flush().await.unwrap();
            let (mut pong, mut reply) = (false, false);
            while !(pong && reply) {
                match tokio::time::timeout(Duration::from_secs(5), client.read_message()).await {
                    Ok(Ok(Some(Message::Pong(_)))) => pong = true,
                    Ok(Ok(Some(Message::Reply(r)))) if r.id == id => reply = true,
                    other => panic!("request {id}: {other:?}"),
                }
            }
        }
        shutdown.cancel();
        let _ = srv.await;
    }

    /// A thousand requests that are refused at once, arriving together: the connection takes
    /// them [`FRAMES_PER_TURN`] at a time and lets the other tasks run in between. Taken all
    /// in one turn, a peer doing this on many connections kept every other connection, and
    /// the watchdog's ping, waiting for seconds (a hostile review got a healthy dispatcher
    /// killed). The refusals come back all the same.
    #[tokio::test(flavor = "current_thread")]
    async fn frames_arriving_together_are_taken_a_turn_at_a_time() {
        const N: u64 = 1_000;
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut client = Connection::new(b, IoLimits::default());
        for id in 1..=N {
            client.queue(&request(id)).unwrap();
        }
        client.flush().await.unwrap();
        let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Another task on the same thread, noting how many frames were handled each time it
        // gets to run.
        let seen = tokio::spawn({
            let handled = handled.clone();
            async move {
                let mut seen = vec![0];
                while seen.last() != Some(&(N as usize)) {
                    tokio::task::yield_now().await;
                    seen.push(handled.load(std::sync::atomic::Ordering::Relaxed));
                }
                seen
            }
        });
        let limits = RequestLimits {
            per_connection: 8,
            identity: crate::server::IdentitySlots::new(8, 1 << 20),
            drain: Duration::from_millis(100),
            leftovers: Leftovers::default(),
        };
        let shutdown = CancellationToken::new();
        let srv = tokio::spawn({
            let handled = handled.clone();
            drive(
                Connection::new(a, IoLimits::default()),
                shutdown.clone(),
                limits,
                move |m, _| {
                    handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match m {
                        Message::Request(q) => Next::Reply(Message::Error(ErrorReply {
                            id: q.id,
                            code: ErrorCode::Denied,
                            message: "no".into(),
                        })),
                        _ => Next::Continue,
                    }
                },
            )
        });
        let seen = tokio::time::timeout(Duration::from_secs(10), seen)
            .await
            .unwrap()
            .unwrap();
        // The other task may run twice in a row, and so may this one (a task that yields is
        // woken after the next look at the sockets, with the others woken meanwhile).
        let longest = seen.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(
            longest <= 2 * FRAMES_PER_TURN,
            "{longest} frames handled in one turn (seen between turns: {seen:?})"
        );
        for id in 1..=N {
            match tokio::time::timeout(Duration::from_secs(5), client.read_message()).await {
                Ok(Ok(Some(Message::Error(e)))) if e.id == id => {}
                other => panic!("request {id}: {other:?}"),
            }
        }
        shutdown.cancel();
        let _ = srv.await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_ping_read_with_a_request_leaves_room_for_it_inline() {
        a_ping_read_with_a_request_leaves_room_for_it().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ping_read_with_a_request_leaves_room_for_it_spawned() {
        a_ping_read_with_a_request_leaves_room_for_it().await;
    }

    /// An answer its peer does not read keeps its request's share of the identity's payload
    /// budget until it is written: given back as the answer came to exist, one identity with
    /// many connections that never read could pin far more than its budget in unwritten
    /// answers (a hostile review pinned ~430 MB of 1 MB echoes, 2,048 connections allow GBs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unread_answer_keeps_its_payload_budget_until_written() {
        const LEN: usize = 64 * 1024;
        // A pipe that holds 4 KiB: the answer cannot be written until the peer reads.
        let (a, b) = tokio::io::duplex(4096);
        let mut client = Connection::new(b, IoLimits::default());
        let identity = crate::server::IdentitySlots::new(8, 1 << 20);
        let (kib, full) = (identity.kib.clone(), identity.kib_limit);
        let limits = RequestLimits {
            per_connection: 8,
            identity,
            drain: Duration::from_millis(100),
            leftovers: Leftovers::default(),
        };
        let answered = Arc::new(tokio::sync::Notify::new());
        let shutdown = CancellationToken::new();
        let srv = tokio::spawn({
            let answered = answered.clone();
            drive(
                Connection::new(a, IoLimits::default()),
                shutdown.clone(),
                limits,
                move |m, s| match m {
                    Message::Request(q) => {
                        let answered = answered.clone();
                        s.start(q.id, Placement::Task, q.payload.len(), async move {
                            answered.notify_one();
                            Message::Reply(Reply {
                                id: q.id,
                                payload: q.payload,
                            })
                        })
                    }
                    _ => Next::Continue,
                },
            )
        });
        let echo = Message::Request(Request {
            id: 1,
            op: "x".into(),
            payload: Bytes::from(vec![5u8; LEN]),
            timeout_ms: None,
        });
        client.send(&echo).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), answered.notified())
            .await
            .expect("the request ran");
        // The answer exists and cannot be written: its 64 KiB stay charged, however long.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(
                kib.available_permits(),
                full - LEN / 1024,
                "the payload budget was given back before the answer was written"
            );
        }
        match tokio::time::timeout(Duration::from_secs(5), client.read_message()).await {
            Ok(Ok(Some(Message::Reply(r)))) => assert_eq!((r.id, r.payload.len()), (1, LEN)),
            other => panic!("expected the echo, got {other:?}"),
        }
        // Written: the budget is free again.
        let freed = async {
            while kib.available_permits() != full {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), freed)
            .await
            .expect("the payload budget is given back once the answer is written");
        shutdown.cancel();
        let _ = srv.await;
    }

    /// An answer larger than its request (a job's output for an empty request) is charged at
    /// its own size until written, and one that does not fit the identity's budget waits for
    /// room, holding its request slot: so answers a peer leaves unread stay within the budget
    /// however small the requests were. The peer then reads, and both answers come.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_larger_than_its_request_is_charged_at_its_own_size() {
        const LEN: usize = 48 * 1024;
        let (a, b) = tokio::io::duplex(4096);
        let mut client = Connection::new(b, IoLimits::default());
        let identity = crate::server::IdentitySlots::new(8, 64 * 1024);
        let (kib, slots) = (identity.kib.clone(), identity.slots.clone());
        let limits = RequestLimits {
            per_connection: 8,
            identity,
            drain: Duration::from_millis(100),
            leftovers: Leftovers::default(),
        };
        let shutdown = CancellationToken::new();
        let srv = tokio::spawn(drive(
            Connection::new(a, IoLimits::default()),
            shutdown.clone(),
            limits,
            |m, s| match m {
                Message::Request(q) => s.start(q.id, Placement::Inline, 0, async move {
                    Message::Reply(Reply {
                        id: q.id,
                        payload: Bytes::from(vec![3u8; LEN]),
                    })
                }),
                _ => Next::Continue,
            },
        ));
        client.queue(&request(1)).unwrap();
        client.queue(&request(2)).unwrap();
        client.flush().await.unwrap();
        // The first answer holds 48 of the 64 KiB, unwritten; the second waits for 48 more
        // (taking the 16 left as they come), with its slot.
        let charged = async {
            while kib.available_permits() != 0 || slots.available_permits() != 7 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let (kib_left, slots_left) = (kib.clone(), slots.clone());
        tokio::time::timeout(Duration::from_secs(5), charged)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "unread answers not charged: {} KiB and {} slots left",
                    kib_left.available_permits(),
                    slots_left.available_permits()
                )
            });
        for id in 1..=2 {
            match tokio::time::timeout(Duration::from_secs(5), client.read_message()).await {
                Ok(Ok(Some(Message::Reply(r)))) => assert_eq!((r.id, r.payload.len()), (id, LEN)),
                other => panic!("expected answer {id}, got {other:?}"),
            }
        }
        let freed = async {
            while kib.available_permits() != 64 || slots.available_permits() != 8 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), freed)
            .await
            .expect("the budget and the slots come back once the answers are written");
        shutdown.cancel();
        let _ = srv.await;
    }
}
