//! A framed message stream over any `AsyncRead + AsyncWrite`, with every wait bounded.
//!
//! [`Connection::read_message`] is cancel-safe (all state lives in the struct), so components
//! can `select!` between reading and writing on one task; a multiplexed link instead writes
//! from a task of its own over the stream's write half ([`write_link`]), so that it never
//! stops reading while a write waits. Reads are bounded three ways: an idle
//! deadline while waiting for a frame to start, a per-frame deadline once its first byte has
//! arrived (a peer dripping one byte a second is cut off), and the frame size cap, checked on
//! the header before the body is buffered. Outgoing frames are queued and written together, so
//! several replies share TLS records and syscalls. No TLS types, roles or tokens here.

use crate::frame::{self, Encoded, FrameError, Spliced};
use crate::message::Message;
use bytes::{Buf, BytesMut};
use flows::Flows;
pub use flows::Outgoing;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

mod flows;

/// Initial read buffer, grown in steps up to [`BIG_READ_CHUNK`] while no frame of
/// [`SHARE_FRAMES_FROM`] bytes or more is pending (such a frame gets a buffer of its own).
const READ_CHUNK: usize = 4 * 1024;
/// Larger growth step once a big frame is on its way.
const BIG_READ_CHUNK: usize = 64 * 1024;
/// Buffers larger than this are released once empty, so one big frame does not pin memory.
const KEEP_BUFFER: usize = 64 * 1024;
/// Bytes of queued frames gathered into one write.
const MAX_BATCH: usize = 256 * 1024;
/// Frames this long or longer that do not arrive in one read are received into a buffer of
/// exactly their size, charged to the connection's frame budget if it has one (see
/// [`Connection::set_frame_budget`]), and decoded without copying their payloads (a payload
/// then holds on to its own frame and nothing else). Other frames are decoded from the shared
/// read buffer, their payloads copied: a slice of that buffer would keep all of it alive.
const SHARE_FRAMES_FROM: usize = 1024;

/// Bounds on one connection's I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoLimits {
    /// Largest frame body accepted.
    pub max_frame: usize,
    /// Time allowed for a frame, from its first byte to its last.
    pub frame_timeout: Duration,
    /// Time allowed between frames.
    pub idle_timeout: Duration,
    /// Time allowed to write queued frames.
    pub write_timeout: Duration,
}

impl Default for IoLimits {
    fn default() -> Self {
        crate::config::Limits::default().io()
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer sent bytes that are not a frame.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A frame started but did not finish in time.
    #[error("frame not completed within {0:?}")]
    FrameTimeout(Duration),
    /// No frame started in time.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// The peer did not take our data in time.
    #[error("write not completed within {0:?}")]
    WriteTimeout(Duration),
    /// The peer closed in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// An earlier write failed part-way; nothing more is written.
    #[error("an earlier write failed; connection unusable")]
    Broken,
    /// Transport failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    /// A wire error to send the peer before closing, if this cause deserves one.
    pub fn to_message(&self) -> Option<Message> {
        use crate::message::ErrorCode;
        match self {
            ConnError::Frame(FrameError::TooLarge { .. }) => Some(Message::connection_error(
                ErrorCode::TooLarge,
                self.to_string(),
            )),
            ConnError::Frame(_) => Some(Message::connection_error(
                ErrorCode::BadRequest,
                self.to_string(),
            )),
            ConnError::FrameTimeout(_) | ConnError::Idle(_) => Some(Message::connection_error(
                ErrorCode::Timeout,
                self.to_string(),
            )),
            _ => None,
        }
    }
}

/// A framed stream.
pub struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    /// The usual read buffer, put aside while `read_buf` is a frame's own buffer.
    spare: Option<BytesMut>,
    write_buf: Vec<u8>,
    /// Large payloads of queued frames, written from their own buffers: each goes at its
    /// offset in `write_buf` (ascending).
    splices: Vec<Spliced>,
    /// Their total length.
    spliced_len: usize,
    /// A write failed part-way: what follows on the stream would not line up with frame
    /// boundaries, so nothing more is written.
    broken: bool,
    /// When the first byte of the frame now being received arrived.
    frame_started: Option<Instant>,
    /// When the last complete frame arrived (or the connection opened).
    last_frame: Instant,
    /// When the last read that returned bytes did.
    last_read: Instant,
    /// Set by a read that returned bytes, cleared when a frame is taken. The first frame
    /// taken after such a read is the one that read completed, taken at once within the same
    /// [`read_message`] call, so the read's clock reading dates it (and the partial frame
    /// behind it) and the clock need not be read again. Frames taken later (the second of
    /// several that one read brought, after the caller's own work) read the clock, so that
    /// time spent on this side is not charged to the peer's frame and idle deadlines.
    ///
    /// [`read_message`]: Self::read_message
    fresh_read: bool,
    /// The read deadline's timer, kept armed from one read to the next: the idle deadline
    /// moves with every frame, and re-arming a timer each time would cost two timer-wheel
    /// updates per request. It is moved only when the deadline comes sooner, or when it
    /// fires before the deadline it stands for (then it is set to that deadline).
    read_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Charged one permit per started KiB for a frame being received into a buffer of its
    /// own, so that frames sent in part cannot pin more memory than the budget holds. Boxed:
    /// most connections have none, and every connection's size counts.
    budget: Option<Box<Budgeted>>,
    limits: IoLimits,
}

/// Runs `fut` until it completes, or `None` once `deadline` has passed. `timer` is kept from
/// one call to the next (see `Connection::read_timer`): armed for an earlier deadline that has
/// since moved on, it is set to `deadline` and waited on again.
async fn before<F: Future>(
    timer: &mut Pin<Box<tokio::time::Sleep>>,
    deadline: Instant,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            () = timer.as_mut() => {
                if Instant::now() >= deadline {
                    return None;
                }
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// A wait for frame budget, kept by the connection across cancelled reads.
type BudgetWait = Pin<
    Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send + Sync>,
>;

/// A connection's frame budget, and its charge for the frame now being received.
struct Budgeted {
    budget: FrameBudget,
    /// The charge for the frame now being received.
    permit: Option<OwnedSemaphorePermit>,
    /// The wait for that charge, while the budget has no room.
    wait: Option<BudgetWait>,
}

/// A budget of memory for frames being received, shared by connections.
#[derive(Clone, Debug)]
pub struct FrameBudget {
    /// One permit per KiB.
    kib: Arc<Semaphore>,
    /// Its size in KiB: a frame is never charged more, so that it can always be received
    /// alone.
    kib_limit: usize,
}

impl FrameBudget {
    /// A budget of `kib` KiB (capped at what a semaphore holds).
    pub fn new(kib: usize) -> Self {
        let kib_limit = kib.min(Semaphore::MAX_PERMITS);
        FrameBudget {
            kib: Arc::new(Semaphore::new(kib_limit)),
            kib_limit,
        }
    }

    /// KiB not charged now.
    pub fn available_kib(&self) -> usize {
        self.kib.available_permits()
    }
}

impl<S> Connection<S> {
    /// Wraps a stream (or one half of it, see [`tokio::io::split`]: a connection over a read
    /// half only reads, one over a write half only writes).
    pub fn new(stream: S, limits: IoLimits) -> Self {
        let now = Instant::now();
        Connection {
            stream,
            read_buf: BytesMut::new(),
            spare: None,
            write_buf: Vec::new(),
            splices: Vec::new(),
            spliced_len: 0,
            broken: false,
            frame_started: None,
            last_frame: now,
            last_read: now,
            fresh_read: false,
            read_timer: None,
            budget: None,
            limits,
        }
    }

    /// Charges every frame of 1 KiB or more that does not arrive in one
    /// read to `budget` while it is being received: it is read only once the budget has room
    /// for all of it (waiting within the frame deadline), and its charge is returned when the
    /// frame is taken. A peer that sends frames in part holds its own budget, not the memory
    /// of the process.
    pub fn set_frame_budget(&mut self, budget: FrameBudget) {
        self.budget = Some(Box::new(Budgeted {
            budget,
            permit: None,
            wait: None,
        }));
    }

    /// Whether the frame now being received holds a charge on the frame budget.
    #[cfg(test)]
    fn charged(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.permit.is_some())
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The limits in force.
    pub fn limits(&self) -> IoLimits {
        self.limits
    }
}

impl<S: AsyncRead + Unpin> Connection<S> {
    /// Reads the next message. `Ok(None)` is a clean close between frames.
    ///
    /// Cancel-safe: dropping the future loses no bytes, and a frame waiting for its budget
    /// keeps its place in the budget's queue.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ConnError> {
        let result = self.read_next().await;
        if result.is_err() {
            // Nothing more is read: the frame in progress gives back its charge and its
            // buffer now, not when the connection is finally dropped.
            if let Some(b) = self.budget.as_mut() {
                b.wait = None;
                b.permit = None;
            }
            if let Some(mut spare) = self.spare.take() {
                spare.clear();
                self.read_buf = spare;
            }
        }
        result
    }

    async fn read_next(&mut self) -> Result<Option<Message>, ConnError> {
        loop {
            if let Some(msg) = self.buffered_message()? {
                return Ok(Some(msg));
            }
            let limits = self.limits;
            let in_frame = self.frame_started.is_some();
            let deadline = match self.frame_started {
                Some(t) => t + limits.frame_timeout,
                None => self.last_frame + limits.idle_timeout,
            };
            let err = || {
                if in_frame {
                    ConnError::FrameTimeout(limits.frame_timeout)
                } else {
                    ConnError::Idle(limits.idle_timeout)
                }
            };
            let timer = self
                .read_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            match frame::check_header(&self.read_buf, self.limits.max_frame)? {
                // An incomplete frame of a sharable size: charged to the frame budget, then
                // moved into a buffer of its own, of exactly its size (allocated, not yet
                // touched: memory is used as bytes arrive). Without a budget (a component's
                // link, whose peer is authenticated infrastructure) it is not charged.
                Some(total) if total >= SHARE_FRAMES_FROM => {
                    if self.spare.is_none() {
                        if let Some(b) = self.budget.as_deref_mut().filter(|b| b.permit.is_none()) {
                            if b.wait.is_none() {
                                let kib = total.div_ceil(1024).min(b.budget.kib_limit).max(1);
                                let kib = u32::try_from(kib).unwrap_or(u32::MAX);
                                match b.budget.kib.clone().try_acquire_many_owned(kib) {
                                    Ok(p) => b.permit = Some(p),
                                    // Queued, and kept across cancelled calls: dropping the
                                    // wait would give up its place in the queue.
                                    Err(_) => {
                                        b.wait = Some(Box::pin(
                                            b.budget.kib.clone().acquire_many_owned(kib),
                                        ))
                                    }
                                }
                            }
                            if let Some(wait) = b.wait.as_mut() {
                                let got = before(timer, deadline, wait.as_mut()).await;
                                b.wait = None;
                                // The semaphore is never closed.
                                b.permit = Some(got.ok_or_else(err)?.map_err(|_| err())?);
                            }
                        }
                        let mut own = BytesMut::with_capacity(total);
                        own.extend_from_slice(&self.read_buf);
                        self.read_buf.clear();
                        let mut spare = std::mem::replace(&mut self.read_buf, own);
                        if spare.capacity() > KEEP_BUFFER {
                            // Grown by an earlier big frame: not worth keeping meanwhile.
                            spare = BytesMut::new();
                        }
                        self.spare = Some(spare);
                    }
                }
                // Frames under SHARE_FRAMES_FROM, or a header still incomplete.
                frame_len => {
                    let missing = frame_len.map_or(READ_CHUNK, |n| n - self.read_buf.len());
                    let want = missing.clamp(READ_CHUNK, BIG_READ_CHUNK);
                    if self.read_buf.capacity() - self.read_buf.len() < want {
                        self.read_buf.reserve(want);
                    }
                }
            }
            let read = self.stream.read_buf(&mut self.read_buf);
            let n = before(timer, deadline, read).await.ok_or_else(err)??;
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
            self.last_read = Instant::now();
            self.fresh_read = true;
            if self.frame_started.is_none() {
                self.frame_started = Some(self.last_read);
            }
        }
    }

    /// Starts the idle timeout again from now, as if a frame had just arrived. For a peer
    /// that is quiet because it waits for answers. No effect while a frame is arriving (its
    /// own deadline runs).
    pub fn restart_idle_clock(&mut self) {
        self.last_frame = Instant::now();
    }

    /// Starts the idle clock, and the clock of a frame in progress, again: for a time this
    /// side chose not to read, which is not the peer's to count.
    pub fn restart_clocks(&mut self) {
        let now = Instant::now();
        self.last_frame = now;
        if self.frame_started.is_some() {
            self.frame_started = Some(now);
        }
    }

    /// The next message if a whole frame is already buffered; never waits or reads.
    pub fn buffered_message(&mut self) -> Result<Option<Message>, ConnError> {
        let Some(total) = frame::check_header(&self.read_buf, self.limits.max_frame)? else {
            return Ok(None);
        };
        if self.read_buf.len() < total {
            return Ok(None);
        }
        // Its charge ends here; a request's payload is charged again while it runs.
        if let Some(b) = self.budget.as_mut() {
            b.permit = None;
        }
        let msg = if let Some(mut spare) = self.spare.take() {
            // The frame's own buffer: its payloads become slices of it, not copies.
            let own = self.read_buf.split_to(total).freeze();
            spare.clear();
            spare.extend_from_slice(&self.read_buf);
            self.read_buf = spare;
            frame::decode_shared(&own)?
        } else {
            let msg = frame::decode_body(&self.read_buf[frame::HEADER_LEN..total])?;
            self.read_buf.advance(total);
            msg
        };
        self.consumed();
        Ok(Some(msg))
    }

    fn consumed(&mut self) {
        let now = if std::mem::take(&mut self.fresh_read) {
            self.last_read
        } else {
            Instant::now()
        };
        self.last_frame = now;
        self.frame_started = (!self.read_buf.is_empty()).then_some(now);
        if self.read_buf.is_empty() && self.read_buf.capacity() > KEEP_BUFFER {
            self.read_buf = BytesMut::new();
        }
    }
}

impl<S: AsyncWrite + Unpin> Connection<S> {
    /// Queues a message to be written by the next [`flush`](Self::flush). A large payload is
    /// not copied: it is written from its own buffer.
    pub fn queue(&mut self, msg: &Message) -> Result<(), FrameError> {
        match msg.payload() {
            Some(payload) => {
                let spliced = frame::encode_splicing(
                    msg,
                    payload,
                    self.limits.max_frame,
                    &mut self.write_buf,
                )?;
                self.add_splice(spliced);
                Ok(())
            }
            None => frame::encode(msg, self.limits.max_frame, &mut self.write_buf),
        }
    }

    /// Queues a frame that was already encoded.
    pub fn queue_encoded(&mut self, frame: &Encoded) {
        let (bytes, spliced) = frame.pieces();
        let base = self.write_buf.len();
        self.write_buf.extend_from_slice(bytes);
        self.add_splice(spliced.map(|s| Spliced {
            at: base + s.at,
            payload: s.payload.clone(),
        }));
    }

    fn add_splice(&mut self, spliced: Option<Spliced>) {
        if let Some(s) = spliced {
            self.spliced_len += s.payload.len();
            self.splices.push(s);
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.write_buf.len() + self.spliced_len
    }

    /// Writes everything queued, under the write deadline. On failure the queue is dropped:
    /// part of it may have gone out, and sending it again would repeat those frames.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        let result = if self.broken {
            Err(ConnError::Broken)
        } else {
            self.write_queued().await
        };
        self.broken |= result.is_err();
        self.write_buf.clear();
        self.splices.clear();
        self.spliced_len = 0;
        if self.write_buf.capacity() > KEEP_BUFFER {
            self.write_buf = Vec::new();
        }
        result
    }

    async fn write_queued(&mut self) -> Result<(), ConnError> {
        if self.queued() == 0 {
            return Ok(());
        }
        if self.splices.is_empty() {
            write_within(&mut self.stream, &self.write_buf, self.limits.write_timeout).await
        } else {
            let mut slices = Vec::with_capacity(2 * self.splices.len() + 1);
            let mut from = 0;
            for s in &self.splices {
                let at = s.at.clamp(from, self.write_buf.len());
                slices.push(IoSlice::new(&self.write_buf[from..at]));
                slices.push(IoSlice::new(&s.payload));
                from = at;
            }
            slices.push(IoSlice::new(&self.write_buf[from..]));
            write_vectored_within(&mut self.stream, &mut slices, self.limits.write_timeout).await
        }
    }

    /// Writes the next batch: `ping` (if any), then frames from `flows` in their turns, up
    /// to a batch of 256 KiB, after taking in every frame already waiting in `rx`. When
    /// `more_coming` (other requests on this link are still in flight), it first lets the
    /// other ready tasks run once, so that frames finishing at the same moment share one TLS
    /// record and one system call: batching without a timer. With nothing else in flight it
    /// writes at once, adding no latency.
    async fn write_batch<T: Outgoing>(
        &mut self,
        ping: Option<T>,
        flows: &mut Flows<T>,
        rx: &mut tokio::sync::mpsc::Receiver<T>,
        more_coming: bool,
    ) -> Result<(), ConnError> {
        if more_coming {
            tokio::task::yield_now().await;
        }
        // Held frames are as many again as the queue holds at most, so the queue still
        // makes its senders wait once the peer reads slowly.
        while flows.len() < rx.max_capacity() {
            match rx.try_recv() {
                Ok(f) => flows.push(f),
                Err(_) => break,
            }
        }
        // Frames whose request's deadline has passed are dropped: nobody waits for their
        // answer. The clock is read once per batch, and only for a frame that has a deadline.
        let mut now = None;
        let mut live = |f: &T| {
            f.expires()
                .is_none_or(|at| at > *now.get_or_insert_with(Instant::now))
        };
        if ping.is_none() && flows.len() == 1 && self.queued() == 0 {
            // A batch of one: written from where it is, without a copy into the buffer.
            return match flows.pop_live(&mut live) {
                Some(only) => self.write_one(only.frame()).await,
                None => Ok(()),
            };
        }
        if let Some(p) = &ping {
            self.queue_encoded(p.frame());
        }
        while self.queued() < MAX_BATCH {
            let Some(f) = flows.pop_live(&mut live) else {
                break;
            };
            self.queue_encoded(f.frame());
        }
        self.flush().await
    }

    /// Writes one frame from where it is, under the write deadline.
    async fn write_one(&mut self, frame: &Encoded) -> Result<(), ConnError> {
        if self.broken {
            return Err(ConnError::Broken);
        }
        let limit = self.limits.write_timeout;
        let result = match frame.pieces() {
            (bytes, None) => write_within(&mut self.stream, bytes, limit).await,
            (_, Some(_)) => {
                let mut parts = frame.parts().map(IoSlice::new);
                write_vectored_within(&mut self.stream, &mut parts, limit).await
            }
        };
        self.broken |= result.is_err();
        result
    }

    /// A write was dropped part-way: nothing more is written (as after a failed one).
    fn abandon_writes(&mut self) {
        self.broken = true;
        self.write_buf.clear();
        self.splices.clear();
        self.spliced_len = 0;
    }

    /// Queues and writes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Best effort: writes what is queued plus `last` (if any; not after a write failed
    /// part-way) and shuts the stream down (a TLS close_notify), all within the write
    /// deadline. Whether all of it was done; the connection is going away either way.
    pub async fn close(&mut self, last: Option<&Message>) -> bool {
        if let (Some(m), false) = (last, self.broken) {
            let _ = self.queue(m);
        }
        let limit = self.limits.write_timeout;
        let closed = tokio::time::timeout(limit, async {
            self.flush().await.is_ok() && self.stream.shutdown().await.is_ok()
        })
        .await;
        closed == Ok(true)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// [`Connection::close`], then reads and discards what the peer still sends until it
    /// closes too, for at most [`LINGER`]; all of it ends by `until` at the latest. Closing a
    /// socket with unread data in it makes the kernel reset the connection, and a reset can
    /// destroy what we sent last (answers, the reason for closing) before the peer has read
    /// it. False if the close itself (the writes and the close_notify) failed or ran out of
    /// the write deadline: the peer does not take what it is sent. (Cut short by `until`, it
    /// is true: that is our deadline, not the peer's failure.)
    pub async fn close_lingering(&mut self, last: Option<&Message>, until: Instant) -> bool {
        let mut closed = true;
        let _ = tokio::time::timeout_at(until, async {
            closed = self.close(last).await;
            // On the heap, and only now: a buffer in the future would be part of every
            // connection's task for its whole life.
            let mut scratch = vec![0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(self.stream.read(&mut scratch).await, Ok(n) if n > 0) {}
            })
            .await;
        })
        .await;
        closed
    }
}

/// How long a closing connection waits for its peer to close ([`Connection::close_lingering`]).
pub const LINGER: Duration = Duration::from_millis(500);

/// How the writing half of a link ended (see [`write_link`]).
pub struct WriterEnd<W, T> {
    /// The connection's write half, to close.
    pub conn: Connection<W>,
    /// The link's queue: the frames still in it never left.
    pub rx: tokio::sync::mpsc::Receiver<T>,
    /// Frames the writer had taken from the queue and not written: they never left either.
    pub held: Vec<T>,
    /// `Err` if a write failed (and ended the link).
    pub result: Result<(), ConnError>,
}

/// The writing half of a multiplexed link (the dispatcher's to a worker, a client's to the
/// dispatcher): writes what arrives on `rx` in batches (`Connection::write_batch`, with
/// `more_coming` asked before each) until `stop` is cancelled, `rx` is closed, or a write
/// fails; then cancels `stop` itself (also if it panics), so that the reading half ends too,
/// and gives back what the end of the link needs. What arrives on `urgent` (pings) goes out
/// with the next batch, ahead of the frames queued on `rx`. Frames of different flows
/// ([`Outgoing::flow`]: the dispatcher's client identities) take turns by bytes (see the
/// `flows` module), and a frame whose [`Outgoing::expires`] has passed when its turn comes is
/// dropped.
///
/// It runs as a task of its own while another reads: a link whose one task read only between
/// writes would deadlock with its peer once both directions carry more than the socket buffers
/// hold, each side blocked writing to the other and neither reading (seen with 1 MiB requests
/// pipelined on the dispatcher's link to a worker). A stop while a batch is being written drops
/// the rest of that batch: the frames taken for it count as sent.
pub async fn write_link<W, T>(
    mut conn: Connection<W>,
    mut rx: tokio::sync::mpsc::Receiver<T>,
    mut urgent: Option<tokio::sync::mpsc::Receiver<T>>,
    more_coming: impl Fn() -> bool,
    stop: tokio_util::sync::CancellationToken,
) -> WriterEnd<W, T>
where
    W: AsyncWrite + Unpin,
    T: Outgoing,
{
    let cancel_on_exit = stop.clone().drop_guard();
    let mut stopped = crate::shutdown::cancelled(&stop);
    let mut flows = Flows::default();
    let result = loop {
        let ping = if flows.is_empty() {
            tokio::select! {
                biased;
                _ = &mut stopped => break Ok(()),
                Some(ping) = async {
                    match urgent.as_mut() {
                        Some(u) => u.recv().await,
                        None => None,
                    }
                }, if urgent.is_some() => Some(ping),
                next = rx.recv() => match next {
                    Some(first) => {
                        flows.push(first);
                        None
                    }
                    None => break Ok(()),
                },
            }
        } else {
            urgent.as_mut().and_then(|u| u.try_recv().ok())
        };
        let more = more_coming();
        let written = tokio::select! {
            biased;
            _ = &mut stopped => None,
            r = conn.write_batch(ping, &mut flows, &mut rx, more) => Some(r),
        };
        match written {
            Some(Ok(())) => {}
            Some(Err(e)) => break Err(e),
            None => {
                // Stopped part-way through a batch: what follows would not line up with
                // frames.
                conn.abandon_writes();
                break Ok(());
            }
        }
    };
    drop(stopped);
    drop(cancel_on_exit);
    WriterEnd {
        conn,
        rx,
        held: flows.into_vec(),
        result,
    }
}

/// Writes all of `data` and flushes it, within `limit`.
async fn write_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
    limit: Duration,
) -> Result<(), ConnError> {
    within(limit, async {
        stream.write_all(data).await?;
        stream.flush().await
    })
    .await
}

/// Writes all of `bufs` (in order) and flushes, within `limit`. The TLS layer copies the
/// pieces straight into its records, so large payloads are never gathered into one buffer.
async fn write_vectored_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut bufs: &mut [IoSlice<'_>],
    limit: Duration,
) -> Result<(), ConnError> {
    let fut = async {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let n = stream.write_vectored(bufs).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        stream.flush().await
    };
    within(limit, fut).await
}

/// Runs a write, failing it if it is still waiting `limit` after it first had to wait. Most
/// writes finish on their first poll (the socket has room), and those arm no timer and read
/// no clock; the deadline then starts within the same turn of the task as the write did.
async fn within(
    limit: Duration,
    fut: impl Future<Output = std::io::Result<()>>,
) -> Result<(), ConnError> {
    let mut fut = std::pin::pin!(fut);
    let at_once = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await;
    let result = match at_once {
        Some(r) => r,
        None => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => return Err(ConnError::WriteTimeout(limit)),
        },
    };
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ping, Reply};

    /// Frames written on a link in these tests: no request id, one flow.
    impl Outgoing for Encoded {
        fn frame(&self) -> &Encoded {
            self
        }
        fn id(&self) -> u64 {
            0
        }
    }

    fn limits() -> IoLimits {
        IoLimits {
            max_frame: 1024,
            frame_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(400),
            write_timeout: Duration::from_millis(200),
        }
    }

    /// [`limits`] with another frame cap.
    fn limits_with_max(max_frame: usize) -> IoLimits {
        IoLimits {
            max_frame,
            ..limits()
        }
    }

    fn ping(n: u8) -> Message {
        Message::Ping(Ping { nonce: vec![n; 16] })
    }

    #[tokio::test]
    async fn messages_round_trip_and_batch() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut tx = Connection::new(a, limits());
        let mut rx = Connection::new(b, limits());
        for n in 0..5 {
            tx.queue(&ping(n)).unwrap();
        }
        tx.flush().await.unwrap();
        for n in 0..5 {
            assert_eq!(rx.read_message().await.unwrap(), Some(ping(n)));
        }
        drop(tx);
        assert_eq!(rx.read_message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn big_and_small_frames_interleave_across_reads() {
        let limits = limits_with_max(64 * 1024);
        let (mut a, b) = tokio::io::duplex(1000);
        let mut rx = Connection::new(b, limits);
        let msgs: Vec<Message> = [10usize, 20_000, 3, SHARE_FRAMES_FROM, 40_000, 0]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Message::Reply(Reply {
                    id: i as u64 + 1,
                    payload: (0..n).map(|k| (k % 251) as u8).collect::<Vec<u8>>().into(),
                })
            })
            .collect();
        let mut wire = Vec::new();
        for m in &msgs {
            frame::encode(m, limits.max_frame, &mut wire).unwrap();
        }
        // Written in odd-sized pieces so frames straddle reads.
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(777) {
                a.write_all(piece).await.unwrap();
            }
            a
        });
        let mut got = Vec::new();
        for _ in 0..msgs.len() {
            got.push(rx.read_message().await.unwrap().unwrap());
        }
        // Payloads handed out earlier stay intact while the buffer is reused.
        assert_eq!(got, msgs);
        drop(writer.await.unwrap());
        assert_eq!(rx.read_message().await.unwrap(), None);
    }

    /// A payload must hold on to nothing but its own frame: not the read buffer, which goes on
    /// taking later frames (a slow 1 KiB request would otherwise keep a buffer grown by an
    /// earlier big frame alive).
    #[tokio::test]
    async fn payloads_do_not_keep_the_read_buffer_alive() {
        let limits = limits_with_max(256 * 1024);
        let (mut a, b) = tokio::io::duplex(512 * 1024);
        let mut rx = Connection::new(b, limits);
        // Small, sharable-size and big frames, written in one go so that several of them
        // arrive complete in one read, and others straddle reads.
        let sizes = [
            2_000usize, 100, 30_000, 1_500, 200_000, 1_200, 50_000, 3_000,
        ];
        let mut wire = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let m = Message::Reply(Reply {
                id: i as u64 + 1,
                payload: vec![i as u8; n].into(),
            });
            frame::encode(&m, limits.max_frame, &mut wire).unwrap();
        }
        a.write_all(&wire).await.unwrap();
        let mut payloads = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let Some(Message::Reply(r)) = rx.read_message().await.unwrap() else {
                panic!("frame {i}");
            };
            assert_eq!(r.payload.len(), n);
            assert!(r.payload.iter().all(|&x| x == i as u8));
            payloads.push(r.payload);
        }
        for (i, p) in payloads.into_iter().enumerate() {
            let n = p.len();
            // Unique: nothing else (the read buffer, other frames) shares its memory; and
            // what it owns is at most its own frame.
            let owned = p
                .try_into_mut()
                .unwrap_or_else(|_| panic!("payload {i} ({n} B) shares the read buffer"));
            assert!(
                owned.capacity() <= n + 64,
                "payload {i}: {} for {n} B",
                owned.capacity()
            );
        }
    }

    /// A reply frame of `payload_len` payload bytes, encoded.
    fn reply_frame(id: u64, payload_len: usize, max: usize) -> Vec<u8> {
        let m = Message::Reply(Reply {
            id,
            payload: vec![id as u8; payload_len].into(),
        });
        frame::encode_to_vec(&m, max).unwrap()
    }

    /// Frames sent in part are charged to the budget the connections share: a frame that does
    /// not fit is not read (nothing allocated for it) until another is taken, and its buffer is
    /// exactly its size, not a doubling of what has arrived.
    #[tokio::test]
    async fn frames_sent_in_part_are_charged_to_their_budget() {
        let limits = IoLimits {
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..limits_with_max(512 * 1024)
        };
        let budget = FrameBudget::new(300);
        let (mut a1, b1) = tokio::io::duplex(1024 * 1024);
        let (mut a2, b2) = tokio::io::duplex(1024 * 1024);
        let mut rx1 = Connection::new(b1, limits);
        let mut rx2 = Connection::new(b2, limits);
        rx1.set_frame_budget(budget.clone());
        rx2.set_frame_budget(budget.clone());
        let f1 = reply_frame(1, 200 * 1024, limits.max_frame);
        let f2 = reply_frame(2, 200 * 1024, limits.max_frame);
        a1.write_all(&f1[..10_000]).await.unwrap();
        a2.write_all(&f2[..10_000]).await.unwrap();
        // Neither frame is complete: these only run until they wait.
        let pending = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(pending, rx1.read_message())
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(pending, rx2.read_message())
                .await
                .is_err()
        );
        assert!(rx1.charged(), "the first frame is charged");
        assert_eq!(
            rx1.read_buf.capacity(),
            f1.len(),
            "a buffer of exactly its size"
        );
        assert!(!rx2.charged(), "the second does not fit beside it");
        assert!(
            rx2.read_buf.capacity() <= BIG_READ_CHUNK,
            "nothing allocated for it"
        );
        // The first frame completes and is taken: its charge is returned, and the second
        // frame is read.
        a1.write_all(&f1[10_000..]).await.unwrap();
        let Some(Message::Reply(r)) = rx1.read_message().await.unwrap() else {
            panic!("the first frame");
        };
        assert_eq!(r.payload.len(), 200 * 1024);
        assert!(!rx1.charged());
        a2.write_all(&f2[10_000..]).await.unwrap();
        let Some(Message::Reply(r)) = rx2.read_message().await.unwrap() else {
            panic!("the second frame");
        };
        assert_eq!((r.id, r.payload.len()), (2, 200 * 1024));
        assert_eq!(budget.available_kib(), 300);
    }

    /// A frame waiting for budget keeps its place in the queue when the read is cancelled
    /// (a session drops its read whenever an answer is ready to write); a frame that arrives
    /// whole in one read is not charged; and a connection that fails gives its charge back
    /// at once.
    #[tokio::test]
    async fn a_budget_wait_keeps_its_place_across_cancelled_reads() {
        let limits = IoLimits {
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..limits_with_max(512 * 1024)
        };
        let budget = FrameBudget::new(300);
        let conn = |stream| {
            let mut c = Connection::new(stream, limits);
            c.set_frame_budget(budget.clone());
            c
        };
        let (mut a1, b1) = tokio::io::duplex(1024 * 1024);
        let (mut a2, b2) = tokio::io::duplex(1024 * 1024);
        let (mut a3, b3) = tokio::io::duplex(1024 * 1024);
        let (mut rx1, mut rx2, mut rx3) = (conn(b1), conn(b2), conn(b3));
        let f1 = reply_frame(1, 200 * 1024, limits.max_frame);
        let f2 = reply_frame(2, 200 * 1024, limits.max_frame);
        let f3 = reply_frame(3, 150 * 1024, limits.max_frame);
        let pending = Duration::from_millis(50);
        // 1 holds 201 KiB; 2 queues for 201, then 3 for 151.
        a1.write_all(&f1[..10_000]).await.unwrap();
        assert!(
            tokio::time::timeout(pending, rx1.read_message())
                .await
                .is_err()
        );
        a2.write_all(&f2[..10_000]).await.unwrap();
        assert!(
            tokio::time::timeout(pending, rx2.read_message())
                .await
                .is_err()
        );
        a3.write_all(&f3[..10_000]).await.unwrap();
        let third = tokio::spawn(async move {
            let r = rx3.read_message().await;
            (rx3, r)
        });
        tokio::time::sleep(pending).await;
        // 2's read is cancelled again and again while 1's charge comes back.
        for _ in 0..3 {
            assert!(
                tokio::time::timeout(pending, rx2.read_message())
                    .await
                    .is_err()
            );
        }
        a1.write_all(&f1[10_000..]).await.unwrap();
        assert!(matches!(rx1.read_message().await, Ok(Some(_))));
        assert!(
            tokio::time::timeout(pending, rx2.read_message())
                .await
                .is_err()
        );
        // (What is left goes to 3 as it waits: tokio hands permits to the queue's head.)
        assert!(rx2.charged(), "2 was first in the queue");
        // 2 fails (its peer goes away mid-frame): its charge goes to 3 at once.
        drop(a2);
        assert!(matches!(
            rx2.read_message().await,
            Err(ConnError::Truncated)
        ));
        assert!(!rx2.charged() && rx2.spare.is_none());
        a3.write_all(&f3[10_000..]).await.unwrap();
        let (_rx3, r) = third.await.unwrap();
        assert!(matches!(r, Ok(Some(Message::Reply(r))) if r.id == 3));
        assert_eq!(budget.available_kib(), 300);
        // A 2 KiB frame that arrives whole is read without a charge: with the whole budget
        // taken, it is still read at once.
        let held = budget.kib.clone().try_acquire_many_owned(300).unwrap();
        let (mut a4, b4) = tokio::io::duplex(64 * 1024);
        let mut rx4 = conn(b4);
        a4.write_all(&reply_frame(4, 2048, limits.max_frame))
            .await
            .unwrap();
        assert!(matches!(rx4.read_message().await, Ok(Some(_))));
        drop(held);
    }

    /// A frame left waiting for budget is still bound by the frame deadline.
    #[tokio::test]
    async fn a_frame_waiting_for_budget_is_cut_off_at_its_deadline() {
        let budget = FrameBudget::new(2);
        let held = budget.kib.clone().try_acquire_many_owned(2).unwrap();
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let mut rx = Connection::new(b, limits_with_max(8 * 1024));
        rx.set_frame_budget(budget.clone());
        let f = reply_frame(1, 1500, 8 * 1024);
        a.write_all(&f[..100]).await.unwrap();
        let err = rx.read_message().await.unwrap_err();
        assert!(matches!(err, ConnError::FrameTimeout(_)), "{err}");
        drop(held);
    }

    #[tokio::test]
    async fn oversize_header_ends_the_connection_at_once() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut rx = Connection::new(b, limits());
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = rx.read_message().await.unwrap_err();
        assert!(
            matches!(err, ConnError::Frame(FrameError::TooLarge { .. })),
            "{err}"
        );
        assert!(
            rx.read_buf.capacity() <= READ_CHUNK * 2,
            "nothing allocated for the body"
        );
        assert!(matches!(
            err.to_message(),
            Some(Message::Error(e)) if e.code == crate::message::ErrorCode::TooLarge
        ));
    }

    #[tokio::test]
    async fn slow_frame_is_cut_off() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut rx = Connection::new(b, limits());
        let frame = frame::encode_to_vec(&ping(1), 1024).unwrap();
        let started = Instant::now();
        let drip = tokio::spawn(async move {
            for byte in frame {
                if a.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let err = rx.read_message().await.unwrap_err();
        assert!(matches!(err, ConnError::FrameTimeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drip.abort();
    }

    #[tokio::test]
    async fn idle_peer_is_cut_off() {
        let (_a, b) = tokio::io::duplex(1024);
        let mut rx = Connection::new(b, limits());
        let err = rx.read_message().await.unwrap_err();
        assert!(matches!(err, ConnError::Idle(_)), "{err}");
    }

    /// The read timer stays armed between reads; it must follow the idle deadline as frames
    /// keep arriving, and still fire once they stop.
    #[tokio::test(start_paused = true)]
    async fn the_idle_deadline_moves_with_each_frame() {
        let (mut a, b) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(500);
        let mut rx = Connection::new(
            b,
            IoLimits {
                idle_timeout: idle,
                ..limits()
            },
        );
        let frame = frame::encode_to_vec(&ping(1), 1024).unwrap();
        let started = Instant::now();
        // Ten frames 100 ms apart, each read waiting for its frame: twice the idle timeout in
        // all, never idle for long.
        let writer = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                a.write_all(&frame).await.unwrap();
            }
            a
        });
        for n in 0..10 {
            let got = rx.read_message().await;
            assert!(
                matches!(got, Ok(Some(Message::Ping(_)))),
                "frame {n}: {got:?}"
            );
        }
        assert!(started.elapsed() >= idle * 2);
        let _a = writer.await.unwrap();
        let err = fails_after(&mut rx, idle).await;
        assert!(matches!(err, ConnError::Idle(_)), "{err}");
    }

    /// The error of the next read, which must come `wait` (of paused time) from now.
    async fn fails_after<S: AsyncRead + AsyncWrite + Unpin>(
        rx: &mut Connection<S>,
        wait: Duration,
    ) -> ConnError {
        let from = Instant::now();
        let err = rx.read_message().await.unwrap_err();
        let waited = from.elapsed();
        assert!(
            waited >= wait && waited <= wait + Duration::from_millis(1),
            "{err} after {waited:?}"
        );
        err
    }

    /// Frames that one read brought but that are taken later are dated when they are taken:
    /// time spent on this side (the caller's work between pipelined frames) is not charged
    /// to the frame behind them.
    #[tokio::test(start_paused = true)]
    async fn frames_taken_later_do_not_shorten_the_next_frames_deadline() {
        let (mut a, b) = tokio::io::duplex(4096);
        let frame_timeout = limits().frame_timeout;
        let mut rx = Connection::new(b, limits());
        // Two whole frames and the start of a third, in one write: one read.
        let mut bytes = frame::encode_to_vec(&ping(1), 1024).unwrap();
        bytes.extend(frame::encode_to_vec(&ping(2), 1024).unwrap());
        bytes.extend(&frame::encode_to_vec(&ping(3), 1024).unwrap()[..5]);
        a.write_all(&bytes).await.unwrap();
        assert_eq!(rx.read_message().await.unwrap(), Some(ping(1)));
        // Our own work takes longer than a frame may.
        tokio::time::sleep(frame_timeout + Duration::from_millis(100)).await;
        assert_eq!(rx.buffered_message().unwrap(), Some(ping(2)));
        // The third frame never completes: cut off a frame timeout after the second was taken.
        let err = fails_after(&mut rx, frame_timeout).await;
        assert!(matches!(err, ConnError::FrameTimeout(_)), "{err}");
        drop(a);
    }

    /// A frame's deadline, sooner than the idle deadline the timer was armed for, is the one
    /// that applies.
    #[tokio::test(start_paused = true)]
    async fn a_slow_frame_is_cut_off_at_its_own_deadline_not_the_idle_one() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut rx = Connection::new(
            b,
            IoLimits {
                idle_timeout: Duration::from_secs(60),
                ..limits()
            },
        );
        let frame = frame::encode_to_vec(&ping(1), 1024).unwrap();
        let drip = tokio::spawn(async move {
            for byte in frame {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if a.write_all(&[byte]).await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(30), rx.read_message())
            .await
            .expect("cut off at the idle deadline, not the frame's")
            .unwrap_err();
        assert!(matches!(err, ConnError::FrameTimeout(_)), "{err}");
        // First byte at 50 ms, frame deadline 200 ms later.
        let t = started.elapsed();
        assert!(
            t >= Duration::from_millis(250) && t <= Duration::from_millis(251),
            "{t:?}"
        );
        drip.abort();
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_a_clean_close() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut rx = Connection::new(b, limits());
        let frame = frame::encode_to_vec(&ping(1), 1024).unwrap();
        a.write_all(&frame[..frame.len() - 1]).await.unwrap();
        drop(a);
        assert!(matches!(rx.read_message().await, Err(ConnError::Truncated)));
    }

    #[tokio::test]
    async fn read_is_cancel_safe() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut rx = Connection::new(b, limits());
        let frame = frame::encode_to_vec(
            &Message::Reply(Reply {
                id: 9,
                payload: vec![7; 100].into(),
            }),
            1024,
        )
        .unwrap();
        a.write_all(&frame[..50]).await.unwrap();
        // Cancel a read half-way through the frame.
        let r = tokio::time::timeout(Duration::from_millis(20), rx.read_message()).await;
        assert!(r.is_err());
        a.write_all(&frame[50..]).await.unwrap();
        assert!(matches!(
            rx.read_message().await.unwrap(),
            Some(Message::Reply(Reply { id: 9, .. }))
        ));
    }

    /// Frames with large payloads (written from the payloads' own buffers) and small ones
    /// go out in order, byte for byte as the plain encoding, whether queued or batched.
    #[tokio::test]
    async fn spliced_payloads_go_out_in_order_as_the_plain_encoding() {
        let big = limits_with_max(1 << 20);
        let reply = |id, len: usize| {
            Message::Reply(Reply {
                id,
                payload: vec![id as u8; len].into(),
            })
        };
        let msgs = [
            ping(1),
            reply(2, 20_000),
            ping(3),
            reply(4, 100),
            reply(5, frame::SPLICE_FROM),
        ];
        let plain: Vec<u8> = msgs
            .iter()
            .flat_map(|m| frame::encode_to_vec(m, big.max_frame).unwrap())
            .collect();
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut tx = Connection::new(a, big);
        for m in &msgs {
            tx.queue(m).unwrap();
        }
        assert_eq!(tx.queued(), plain.len());
        assert!(tx.write_buf.len() < 1000, "large payloads were copied");
        tx.flush().await.unwrap();
        let mut got = vec![0u8; plain.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, plain);

        // The same frames through write_batch: a lone one, then several together.
        let encoded: Vec<Encoded> = msgs
            .iter()
            .map(|m| {
                let p = m.payload().cloned().unwrap_or_default();
                frame::encode_spliced(m, &p, big.max_frame).unwrap()
            })
            .collect();
        let (qtx, mut qrx) = tokio::sync::mpsc::channel(8);
        let mut flows = Flows::default();
        flows.push(encoded[1].clone());
        tx.write_batch(None, &mut flows, &mut qrx, false)
            .await
            .unwrap();
        flows.push(encoded[0].clone());
        for e in &encoded[2..] {
            qtx.send(e.clone()).await.unwrap();
        }
        tx.write_batch(None, &mut flows, &mut qrx, false)
            .await
            .unwrap();
        assert!(flows.is_empty());
        let expected: Vec<u8> = [
            &encoded[1],
            &encoded[0],
            &encoded[2],
            &encoded[3],
            &encoded[4],
        ]
        .iter()
        .flat_map(|e| e.to_vec())
        .collect();
        let mut got = vec![0u8; expected.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        assert_eq!(tx.queued(), 0);
    }

    /// Frames with spliced payloads, and their plain encoding.
    fn spliced_frames() -> (Vec<Message>, Vec<u8>) {
        let msgs: Vec<Message> = (1..=4u64)
            .map(|id| {
                Message::Reply(Reply {
                    id,
                    payload: vec![id as u8; 3_000 * id as usize].into(),
                })
            })
            .chain([ping(9)])
            .collect();
        let plain = msgs
            .iter()
            .flat_map(|m| frame::encode_to_vec(m, limits_with_max(1 << 20).max_frame).unwrap())
            .collect();
        (msgs, plain)
    }

    /// A stream that takes a few bytes per write makes every vectored write partial.
    #[tokio::test]
    async fn partial_vectored_writes_resume_where_they_stopped() {
        let (msgs, plain) = spliced_frames();
        let (a, mut b) = tokio::io::duplex(37);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got)
        });
        let mut tx = Connection::new(a, limits_with_max(1 << 20));
        for m in &msgs {
            tx.queue(m).unwrap();
        }
        assert!(!tx.splices.is_empty());
        tx.flush().await.unwrap();
        tx.close(None).await;
        drop(tx);
        assert_eq!(reader.await.unwrap().unwrap(), plain);
    }

    /// After a write timed out part-way, nothing is sent again: the peer sees a prefix of the
    /// frames, never a repeat of what already went out.
    #[tokio::test]
    async fn a_failed_write_is_not_repeated_on_close() {
        let (msgs, plain) = spliced_frames();
        let (a, mut b) = tokio::io::duplex(10_000);
        let mut tx = Connection::new(a, limits_with_max(1 << 20));
        for m in &msgs {
            tx.queue(m).unwrap();
        }
        assert!(matches!(tx.flush().await, Err(ConnError::WriteTimeout(_))));
        assert_eq!(tx.queued(), 0);
        assert!(matches!(tx.send(&ping(1)).await, Err(ConnError::Broken)));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got)
        });
        tx.close(Some(&ping(2))).await;
        drop(tx);
        let got = reader.await.unwrap().unwrap();
        assert!(
            got.len() < plain.len(),
            "sent {} of {}",
            got.len(),
            plain.len()
        );
        assert_eq!(got, plain[..got.len()]);
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_hits_the_write_deadline() {
        let (_a, b) = tokio::io::duplex(64);
        let mut tx = Connection::new(b, limits());
        tx.queue(&Message::Reply(Reply {
            id: 1,
            payload: vec![0; 900].into(),
        }))
        .unwrap();
        assert!(matches!(tx.flush().await, Err(ConnError::WriteTimeout(_))));
    }

    /// A link's writer stopped while a batch is blocked half-written sends nothing more, its
    /// close included: the peer sees a prefix of the frames, never a repeat. A writer whose
    /// write fails stops the link's reading side through the token they share.
    #[tokio::test]
    async fn a_link_writer_stopped_mid_batch_sends_nothing_more() {
        let (msgs, plain) = spliced_frames();
        let frames = msgs
            .iter()
            .map(|m| {
                let p = m.payload().cloned().unwrap_or_default();
                frame::encode_spliced(m, &p, 1 << 20).unwrap()
            })
            .collect();
        let (mut end, mut b, first) = writer_stopped_mid_batch(frames).await;
        assert!(end.result.is_ok());
        assert!(matches!(end.conn.flush().await, Err(ConnError::Broken)));
        end.conn.close(None).await;
        drop(end);
        let mut got = vec![first];
        b.read_to_end(&mut got).await.unwrap();
        assert!(got.len() < plain.len(), "the whole batch went out");
        assert_eq!(got[..], plain[..got.len()], "not a prefix of the frames");

        // A failed write (the peer is gone) ends the writer and cancels the shared token.
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let (qtx, qrx) = tokio::sync::mpsc::channel(1);
        qtx.send(frame::encode_spliced(&ping(1), &bytes::Bytes::new(), 1 << 20).unwrap())
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let end = write_link(
            Connection::new(a, limits_with_max(1 << 20)),
            qrx,
            None,
            || false,
            stop.clone(),
        )
        .await;
        assert!(end.result.is_err());
        assert!(stop.is_cancelled());
    }

    /// A frame on the urgent queue (a ping) goes out ahead of those already queued on the
    /// link's main queue.
    #[tokio::test]
    async fn a_link_writer_sends_urgent_frames_first() {
        let limits = limits_with_max(1 << 20);
        let enc = |m: &Message| {
            let p = m.payload().cloned().unwrap_or_default();
            frame::encode_spliced(m, &p, limits.max_frame).unwrap()
        };
        let (qtx, qrx) = tokio::sync::mpsc::channel(16);
        let (utx, urx) = tokio::sync::mpsc::channel(1);
        let reply = |id| {
            Message::Reply(Reply {
                id,
                payload: vec![1; 100].into(),
            })
        };
        for id in 1..=3 {
            qtx.send(enc(&reply(id))).await.unwrap();
        }
        utx.send(enc(&ping(9))).await.unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(write_link(
            Connection::new(a, limits),
            qrx,
            Some(urx),
            || true,
            stop.clone(),
        ));
        let mut rx = Connection::new(b, limits);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rx.read_message().await.unwrap().unwrap());
        }
        assert_eq!(got[0], ping(9), "{got:?}");
        assert_eq!(got[1..], [reply(1), reply(2), reply(3)]);
        stop.cancel();
        assert!(writer.await.unwrap().result.is_ok());
    }

    /// A frame for the writer tests: flow, id, the frame, when it expires.
    struct Held(u64, u64, Encoded, Option<Instant>);

    impl Outgoing for Held {
        fn frame(&self) -> &Encoded {
            &self.2
        }
        fn id(&self) -> u64 {
            self.1
        }
        fn flow(&self) -> u64 {
            self.0
        }
        fn expires(&self) -> Option<Instant> {
            self.3
        }
    }

    fn encoded_reply(id: u64, len: usize) -> Encoded {
        let m = Message::Reply(Reply {
            id,
            payload: vec![7u8; len].into(),
        });
        let p = m.payload().cloned().unwrap_or_default();
        frame::encode_spliced(&m, &p, 1 << 20).unwrap()
    }

    /// Starts a link writer over a 1000-byte pipe with `frames` queued, stops it once the
    /// first byte of its first batch has come out (the pipe holds less than the batch), and
    /// gives back how it ended, the pipe's other end, and that byte.
    async fn writer_stopped_mid_batch<T: Outgoing + Send + 'static>(
        frames: Vec<T>,
    ) -> (
        WriterEnd<tokio::io::DuplexStream, T>,
        tokio::io::DuplexStream,
        u8,
    ) {
        let (qtx, qrx) = tokio::sync::mpsc::channel(16);
        for f in frames {
            assert!(qtx.try_send(f).is_ok(), "more frames than the queue holds");
        }
        let (a, mut b) = tokio::io::duplex(1000);
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(write_link(
            Connection::new(a, limits_with_max(1 << 20)),
            qrx,
            None,
            || true,
            stop.clone(),
        ));
        let mut first = [0u8; 1];
        b.read_exact(&mut first).await.unwrap();
        stop.cancel();
        (writer.await.unwrap(), b, first[0])
    }

    /// Frames the writer took off the queue but had not started to write when it stopped are
    /// given back as never sent; those of the batch being written are not.
    #[tokio::test]
    async fn a_stopped_link_writer_gives_back_the_frames_it_held() {
        // The first batch (two frames: 256 KiB) is being written when it stops.
        let frames = (1..=5)
            .map(|id| Held(1, id, encoded_reply(id, 200_000), None))
            .collect();
        let (end, _b, _) = writer_stopped_mid_batch(frames).await;
        let mut held: Vec<u64> = end.held.iter().map(|f| f.1).collect();
        held.sort_unstable();
        assert_eq!(held, [3, 4, 5]);
    }

    /// A frame whose deadline has passed when its turn comes is dropped, not written.
    #[tokio::test]
    async fn a_link_writer_drops_frames_past_their_deadline() {
        let limits = limits_with_max(1 << 20);
        let (qtx, qrx) = tokio::sync::mpsc::channel(16);
        let past = Instant::now() - Duration::from_millis(1);
        let later = Instant::now() + Duration::from_secs(60);
        qtx.send(Held(1, 1, encoded_reply(1, 10), Some(past)))
            .await
            .unwrap();
        qtx.send(Held(2, 2, encoded_reply(2, 10), None))
            .await
            .unwrap();
        qtx.send(Held(1, 3, encoded_reply(3, 10), Some(past)))
            .await
            .unwrap();
        qtx.send(Held(1, 4, encoded_reply(4, 10), Some(later)))
            .await
            .unwrap();
        drop(qtx);
        let (a, b) = tokio::io::duplex(1 << 16);
        let end = write_link(
            Connection::new(a, limits),
            qrx,
            None,
            || false,
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        assert!(end.result.is_ok());
        drop(end);
        let mut rx = Connection::new(b, limits);
        let mut got = Vec::new();
        while let Ok(Some(m)) = rx.read_message().await {
            got.push(m);
        }
        let ids: Vec<u64> = got
            .iter()
            .map(|m| match m {
                Message::Reply(r) => r.id,
                other => panic!("{other:?}"),
            })
            .collect();
        // Flow 1's turn first: 1 and 3 are dropped, 4 is written; then flow 2's.
        assert_eq!(ids, [4, 2]);
    }
}
