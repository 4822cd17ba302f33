//! The client library: one mTLS connection to the dispatcher, shared by any number of tasks,
//! with requests pipelined and answers matched by id.
//!
//! [`Client::call`] never waits forever: every call has a deadline. A broken connection is
//! re-dialled on the next call, with backoff; a call whose request never left is always
//! retried, and a call whose connection died after sending is retried only for idempotent ops
//! (the built-ins, or as the caller says in [`CallOptions`]).

use crate::connection::{Connection, IoLimits};
use crate::frame::{self, Encoded};
use crate::identity::SpiffeId;
use crate::inflight::InFlight;
use crate::message::{Bytes, ErrorCode, Message};
use crate::tls::{ClientStream, Connector, HandshakeError, TlsConfigError, TlsMaterial};
use serde::Serialize;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Default deadline of a call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests a connection queues before `call` waits for room.
const QUEUE: usize = 1024;

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error.
    #[error("{code}: {message}")]
    Remote {
        /// The error code.
        code: ErrorCode,
        /// The service's explanation.
        message: String,
    },
    /// Could not connect or the handshake was refused.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The dispatcher address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection broke while the request was in progress (non-idempotent ops only).
    #[error("connection lost while the request was in progress; it may or may not have run")]
    ConnectionLost,
    /// The call's deadline passed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be encoded (too large).
    #[error("{0}")]
    Request(String),
}

/// What kind of failure this is, for exit codes and retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The service refused the request (ACL, unknown op, bad input, too large, token).
    Refused,
    /// No capacity now: unavailable, overloaded, timeout, shutting down, worker lost.
    Unavailable,
    /// The op ran and failed.
    OpFailed,
    /// Connection or TLS failure.
    Connection,
    /// Anything else.
    Other,
}

impl ClientError {
    /// The class of this failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            ClientError::Remote { code, .. } => match code {
                ErrorCode::BadRequest
                | ErrorCode::UnknownOp
                | ErrorCode::Denied
                | ErrorCode::TooLarge
                | ErrorCode::InvalidToken => FailureKind::Refused,
                ErrorCode::Unavailable
                | ErrorCode::Timeout
                | ErrorCode::Overloaded
                | ErrorCode::ShuttingDown
                | ErrorCode::WorkerLost => FailureKind::Unavailable,
                ErrorCode::OpFailed => FailureKind::OpFailed,
                ErrorCode::Internal | ErrorCode::Unknown => FailureKind::Other,
            },
            ClientError::Connect { .. } | ClientError::ConnectionLost => FailureKind::Connection,
            ClientError::Timeout(_) => FailureKind::Unavailable,
            ClientError::Request(_) => FailureKind::Refused,
        }
    }
}

/// How to reach the dispatcher.
#[derive(Clone)]
pub struct ClientConfig {
    /// Dispatcher address.
    pub addr: SocketAddr,
    /// The dispatcher identity to accept.
    pub server_id: SpiffeId,
    /// Dialler for that identity.
    pub connector: Connector,
    /// Frame and timeout limits.
    pub io: IoLimits,
    /// Default deadline of a call.
    pub call_timeout: Duration,
    /// Calls in flight on the connection at once; more wait their turn (the dispatcher
    /// answers `overloaded` beyond its own per-connection limit).
    pub max_in_flight: usize,
}

impl ClientConfig {
    /// A configuration from loaded TLS material.
    pub fn new(
        material: &TlsMaterial,
        addr: SocketAddr,
        server_id: SpiffeId,
    ) -> Result<Self, TlsConfigError> {
        let limits = crate::config::Limits::default();
        Ok(ClientConfig {
            addr,
            connector: material.connector(&server_id, limits.handshake_timeout())?,
            server_id,
            io: IoLimits {
                // Idle is the client's business; calls carry their own deadlines.
                idle_timeout: Duration::from_secs(24 * 3600),
                ..limits.io()
            },
            call_timeout: DEFAULT_CALL_TIMEOUT,
            max_in_flight: limits.max_in_flight_per_connection,
        })
    }
}

/// Options for one call.
#[derive(Debug, Clone, Copy)]
pub struct CallOptions {
    /// Whether the op may run twice (decides retry after a lost connection).
    pub idempotent: bool,
    /// Deadline of this call.
    pub timeout: Duration,
}

/// What a waiting call learns from the connection task.
enum Outcome {
    /// The dispatcher answered (a reply or an error for this request).
    Done(Result<Bytes, ClientError>),
    /// The connection ended before the request was written: safe to send again.
    NotSent,
    /// The connection ended after the request was written.
    Lost,
    /// The dispatcher closed the connection with this reason.
    Closed(ClientError),
}

/// One connection and its calls in flight.
struct Link {
    tx: mpsc::Sender<(u64, Encoded)>,
    /// Cancelled by [`Client::close`]: the connection task says goodbye and ends.
    close: tokio_util::sync::CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Calls waiting for their answer.
    pending: InFlight<Outcome>,
    next_id: AtomicU64,
}

/// A cheap-to-clone handle to a connection to the dispatcher.
#[derive(Clone)]
pub struct Client {
    cfg: Arc<ClientConfig>,
    slots: Arc<tokio::sync::Semaphore>,
    link: Arc<tokio::sync::Mutex<Option<Arc<Link>>>>,
}

/// Why one attempt failed, for the retry loop.
enum Failure {
    /// Do not retry.
    Final(ClientError),
    /// The request never left; retry (after re-dialling) is always safe.
    NotSent(Option<ClientError>),
    /// The request may have reached the dispatcher.
    Lost,
}

impl Client {
    /// Connects (so that configuration and TLS problems show at once).
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let client = Client {
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight.max(1))),
            cfg: Arc::new(cfg),
            link: Arc::new(tokio::sync::Mutex::new(None)),
        };
        client.current_link().await?;
        Ok(client)
    }

    /// Calls `op`; built-in ops (`echo`, `sha256`, `sleep`) count as idempotent.
    pub async fn call(&self, op: &str, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
        let opts = CallOptions {
            idempotent: crate::config::BUILTIN_OPS.contains(&op),
            timeout: self.cfg.call_timeout,
        };
        self.call_with(op, payload, opts).await
    }

    /// Calls `op` with explicit options.
    pub async fn call_with(
        &self,
        op: &str,
        payload: &[u8],
        opts: CallOptions,
    ) -> Result<Vec<u8>, ClientError> {
        self.call_bytes(op, Bytes::copy_from_slice(payload), opts)
            .await
            .map(Vec::from)
    }

    /// Calls `op` with a payload (and returns an answer) shared rather than copied: a large
    /// payload goes from its buffer straight into TLS records.
    pub async fn call_bytes(
        &self,
        op: &str,
        payload: Bytes,
        opts: CallOptions,
    ) -> Result<Bytes, ClientError> {
        let deadline = Instant::now() + opts.timeout;
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.slots.acquire()).await else {
            return Err(ClientError::Timeout(opts.timeout));
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, self.attempt(op, &payload, opts.timeout)).await;
            let last = match attempt {
                Err(_) => return Err(ClientError::Timeout(opts.timeout)),
                Ok(Ok(out)) => return Ok(out),
                Ok(Err(Failure::Final(e))) => return Err(e),
                Ok(Err(Failure::Lost)) if !opts.idempotent => {
                    return Err(ClientError::ConnectionLost);
                }
                Ok(Err(Failure::Lost)) => ClientError::ConnectionLost,
                Ok(Err(Failure::NotSent(e))) => e.unwrap_or(ClientError::ConnectionLost),
            };
            // Connection trouble: re-dial with backoff while the deadline allows.
            if Instant::now() + backoff >= deadline {
                return Err(last);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One try on the current connection (dialling one if needed).
    async fn attempt(
        &self,
        op: &str,
        payload: &Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Failure> {
        let link = self
            .current_link()
            .await
            .map_err(|e| Failure::NotSent(Some(e)))?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame::encode_spliced(
            &RequestRef::Request {
                id,
                op,
                payload,
                timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            },
            payload,
            self.cfg.io.max_frame,
        )
        .map_err(|e| Failure::Final(ClientError::Request(e.to_string())))?;
        let Some(orx) = link.pending.register(id) else {
            return Err(Failure::NotSent(None));
        };
        if link.tx.send((id, frame)).await.is_err() {
            return Err(Failure::NotSent(None));
        }
        match orx.await {
            Ok(Outcome::Done(r)) => r.map_err(Failure::Final),
            Ok(Outcome::NotSent) => Err(Failure::NotSent(None)),
            Ok(Outcome::Closed(e)) => Err(Failure::Final(e)),
            Ok(Outcome::Lost) | Err(_) => Err(Failure::Lost),
        }
    }

    /// Closes the connection cleanly (TLS close_notify), failing calls still in flight.
    pub async fn close(&self) {
        let link = self.link.lock().await.take();
        if let Some(link) = link {
            link.close.cancel();
            let task = link.task.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(t) = task {
                let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
            }
        }
    }

    async fn current_link(&self) -> Result<Arc<Link>, ClientError> {
        let mut guard = self.link.lock().await;
        if let Some(l) = guard.as_ref().filter(|l| !l.tx.is_closed()) {
            return Ok(l.clone());
        }
        let (stream, _) = self
            .cfg
            .connector
            .connect(self.cfg.addr)
            .await
            .map_err(|e| connect_error(self.cfg.addr, e))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Arc::new(Link {
            tx,
            close: tokio_util::sync::CancellationToken::new(),
            task: Mutex::new(None),
            pending: InFlight::default(),
            next_id: AtomicU64::new(1),
        });
        let task = tokio::spawn(run_link(
            link.clone(),
            Connection::new(stream, self.cfg.io),
            rx,
        ));
        *link.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        *guard = Some(link.clone());
        Ok(link)
    }
}

fn connect_error(addr: SocketAddr, e: HandshakeError) -> ClientError {
    ClientError::Connect {
        addr,
        reason: e.to_string(),
    }
}

/// A borrowed `request` message (encodes like [`Message::Request`]).
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RequestRef<'a> {
    Request {
        id: u64,
        op: &'a str,
        #[serde(with = "serde_bytes")]
        payload: &'a [u8],
        timeout_ms: u32,
    },
}

/// Owns the connection: writes queued requests in batches, routes answers to their callers,
/// and fails every waiting call when the connection ends.
async fn run_link(
    link: Arc<Link>,
    mut conn: Connection<ClientStream>,
    mut rx: mpsc::Receiver<(u64, Encoded)>,
) {
    let mut closing_reason: Option<ClientError> = None;
    loop {
        tokio::select! {
            _ = link.close.cancelled() => break,
            Some(first) = rx.recv() => {
                let more = link.pending.len() > 1;
                if conn.write_batch(first, &mut rx, more, |(_, f)| f).await.is_err() {
                    break;
                }
            }
            r = conn.read_message() => match r {
                Ok(Some(Message::Reply(r))) => link.pending.complete(r.id, Outcome::Done(Ok(r.payload))),
                Ok(Some(Message::Error(e))) if e.id == 0 => {
                    // The dispatcher is closing the connection and says why.
                    closing_reason = Some(ClientError::Remote { code: e.code, message: e.message });
                    break;
                }
                Ok(Some(Message::Error(e))) => link.pending.complete(e.id, Outcome::Done(Err(ClientError::Remote { code: e.code, message: e.message }))),
                Ok(Some(_)) | Ok(None) | Err(_) => break,
            },
            else => break,
        }
    }
    link.pending.close(
        &mut rx,
        || Outcome::NotSent,
        || match &closing_reason {
            Some(e) => Outcome::Closed(e.clone()),
            None => Outcome::Lost,
        },
    );
    conn.close(None).await;
}
