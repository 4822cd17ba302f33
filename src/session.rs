//! The request loop of a listening component: read messages, run each request in its own task,
//! write the answers back in batches, and drain in-flight work on close or shutdown.
//!
//! One task owns the connection and `select!`s between the next incoming frame and the answers
//! finished by request tasks, so answers that finish together share one TLS record and one
//! syscall. Requests beyond the per-connection in-flight limit are answered `overloaded` at
//! once; the connection and the other requests go on. Handlers see [`Message`]s, never bytes.

use crate::connection::{ConnError, Connection};
use crate::frame;
use crate::message::{ErrorCode, ErrorReply, Message};
use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// What the loop does after a message was handled.
#[derive(Debug)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// Answer this at once (refusals that need no task), then keep reading.
    Reply(Message),
    /// Send this (if any) and close the connection.
    Close(Option<Message>),
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
}

/// Handle through which a message handler starts request tasks.
pub struct Session {
    tx: mpsc::Sender<Vec<u8>>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    identity: crate::server::IdentitySlots,
    tracker: TaskTracker,
    max_frame: usize,
    /// Refusals since the last log line about them (logged at most once a second).
    refusals: Cell<(u64, Option<Instant>)>,
}

impl Session {
    /// Runs `work` in its own task and sends the message it returns; if the connection already
    /// has its limit of requests in flight, answers `overloaded` instead (returned as `Err` for
    /// the caller to send at once).
    pub fn spawn<F>(&self, id: u64, work: F) -> Result<(), Message>
    where
        F: Future<Output = Message> + Send + 'static,
    {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(self.refuse(
                id,
                format!(
                    "too many requests in flight on this connection (limit {})",
                    self.max_in_flight
                ),
            ));
        };
        let Ok(identity_permit) = self.identity.slots.clone().try_acquire_owned() else {
            return Err(self.refuse(
                id,
                format!(
                    "too many requests in flight for this identity (limit {})",
                    self.identity.limit
                ),
            ));
        };
        let tx = self.tx.clone();
        let max_frame = self.max_frame;
        self.tracker.spawn(async move {
            let msg = work.await;
            let frame = frame::encode_to_vec(&msg, max_frame).or_else(|e| {
                frame::encode_to_vec(
                    &Message::Error(ErrorReply {
                        id,
                        code: ErrorCode::TooLarge,
                        message: format!("answer cannot be sent: {e}"),
                    }),
                    max_frame,
                )
            });
            if let Ok(frame) = frame {
                let _ = tx.send(frame).await;
            }
            drop(permit);
            drop(identity_permit);
        });
        Ok(())
    }

    /// An `overloaded` answer, with a log line at most once a second per connection.
    fn refuse(&self, id: u64, message: String) -> Message {
        let (count, last) = self.refusals.get();
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            warn!(refused = count + 1, reason = %message, "refusing requests: limit reached");
            self.refusals.set((0, Some(now)));
        } else {
            self.refusals.set((count + 1, last));
        }
        Message::Error(ErrorReply {
            id,
            code: ErrorCode::Overloaded,
            message,
        })
    }

    /// Requests running now on this connection.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }
}

/// Drives `conn` until the peer closes, a protocol error, or `shutdown`; then waits up to
/// `drain` for running requests and delivers their answers before closing.
pub async fn drive<S, F>(
    mut conn: Connection<S>,
    shutdown: CancellationToken,
    limits: RequestLimits,
    mut on_message: F,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Message, &Session) -> Next,
{
    let max_in_flight = limits.per_connection.max(1);
    let drain = limits.drain;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(max_in_flight + 8);
    let session = Session {
        tx,
        in_flight: Arc::new(Semaphore::new(max_in_flight)),
        max_in_flight,
        identity: limits.identity,
        tracker: TaskTracker::new(),
        max_frame: conn.limits().max_frame,
        refusals: Cell::new((0, None)),
    };
    let mut last: Option<Message> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                debug!("shutting down: no new requests on this connection");
                break;
            }
            Some(frame) = rx.recv() => {
                // This answer's task may still hold its slot; more than one taken means
                // other answers are on their way.
                let more = session.in_flight() > 1;
                if let Err(e) = conn.write_batch(frame, &mut rx, more, |f| f).await {
                    info!(error = %e, "connection lost while writing");
                    return;
                }
            }
            r = conn.read_message() => match r {
                Ok(Some(msg)) => match on_message(msg, &session) {
                    Next::Continue => {}
                    Next::Reply(m) => {
                        if let Err(e) = conn.send(&m).await {
                            info!(error = %e, "connection lost while writing");
                            return;
                        }
                    }
                    Next::Close(m) => {
                        last = m;
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    log_read_error(&e);
                    last = e.to_message();
                    break;
                }
            }
        }
    }
    session.tracker.close();
    let deadline = tokio::time::Instant::now() + drain;
    loop {
        tokio::select! {
            Some(frame) = rx.recv() => {
                conn.queue_encoded(&frame);
                if conn.flush().await.is_err() {
                    return;
                }
            }
            _ = session.tracker.wait() => break,
            _ = tokio::time::sleep_until(deadline) => {
                info!(abandoned = session.in_flight(), "drain deadline passed");
                break;
            }
        }
    }
    while let Ok(frame) = rx.try_recv() {
        conn.queue_encoded(&frame);
    }
    conn.close(last.as_ref()).await;
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
