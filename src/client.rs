//! The client library: one mTLS connection to the dispatcher, shared by any number of tasks,
//! with requests pipelined and answers matched by id.
//!
//! [`Client::call`] never waits forever: one deadline covers connecting, sending and the answer.
//! A call dials when it has no connection, and re-dials with a short backoff while its deadline
//! allows when nothing listens yet (a dispatcher restarting) or the connection broke: a request
//! that never left is always sent again, one that may have reached the dispatcher only for
//! idempotent ops (the built-ins, or as the caller says in [`CallOptions`]). A TLS refusal —
//! the dispatcher refused our certificate, or we refused its — is final and never retried.
//! Errors say whether the request can have run ([`ClientError`]).

use crate::connection::{ConnError, Connection, IoLimits};
use crate::frame::{self, Encoded};
use crate::identity::SpiffeId;
use crate::inflight::InFlight;
use crate::message::{Bytes, ErrorCode, Message};
use crate::tls::{ClientStream, Connector, TlsConfigError, TlsMaterial};
use serde::Serialize;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod error;
pub use error::{ClientError, FailureKind};

/// Default deadline of a call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests a connection queues before `call` waits for room.
const QUEUE: usize = 1024;
/// First pause before a call tries again; it doubles up to [`MAX_BACKOFF`]. Short, so that a
/// dispatcher restarting (a few hundred milliseconds of "connection refused") costs little.
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
/// Longest pause between two tries of one call.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How long a connection whose write failed before any answer waits for the alert that may
/// explain it (a dispatcher that refused our certificate and closed).
const ALERT_GRACE: Duration = Duration::from_millis(200);

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
    /// The dispatcher closed the connection with this reason, or refused our certificate.
    Closed(ClientError),
}

/// One connection and its calls in flight.
struct Link {
    tx: mpsc::Sender<Queued>,
    /// Cancelled by [`Client::close`]: the connection task says goodbye and ends.
    close: tokio_util::sync::CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Calls waiting for their answer.
    pending: InFlight<Outcome>,
    next_id: AtomicU64,
    /// Set, before the waiting calls are failed, when the dispatcher refused our certificate:
    /// a call that finds the connection already gone learns why instead of trying again.
    refused: OnceLock<ClientError>,
    /// Set when the dispatcher answered `shutting_down`: it finishes what it has on this
    /// connection, and new calls dial again (its successor, once it listens).
    draining: std::sync::atomic::AtomicBool,
}

/// A request waiting for the connection's writer, dropped unwritten if its call's deadline
/// passes first: nobody would wait for its answer (see `connection::write_link`).
struct Queued {
    id: u64,
    deadline: Instant,
    frame: Encoded,
}

impl crate::connection::Outgoing for Queued {
    fn frame(&self) -> &Encoded {
        &self.frame
    }

    fn id(&self) -> u64 {
        self.id
    }

    fn expires(&self) -> Option<Instant> {
        Some(self.deadline)
    }
}

/// A cheap-to-clone handle to a connection to the dispatcher.
#[derive(Clone)]
pub struct Client {
    cfg: Arc<ClientConfig>,
    slots: Arc<tokio::sync::Semaphore>,
    link: Arc<tokio::sync::Mutex<Option<Arc<Link>>>>,
    /// A call has said that it is trying again (the dispatcher unreachable, or the connection
    /// lost); said once until a connection is made again, so that a wait is never silent and
    /// an outage is not a line per call.
    retry_said: Arc<AtomicBool>,
}

/// What tokio's timers take for "never": about 30 years.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// A call's waiter on its connection, removed when the call stops waiting before an answer
/// came (id 0: nothing to remove; no request has id 0).
struct Waiting<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.id != 0 {
            self.link.pending.forget(self.id);
        }
    }
}

/// Why one exchange on a connection failed, for the retry loop.
enum Failure {
    /// Do not retry.
    Final(ClientError),
    /// The request never left; retry (after re-dialling) is always safe.
    NotSent,
    /// The request may have reached the dispatcher.
    Lost,
}

impl Client {
    /// A client that connects on its first call, within that call's deadline.
    pub fn new(cfg: ClientConfig) -> Client {
        Client {
            slots: Arc::new(tokio::sync::Semaphore::new(
                cfg.max_in_flight
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            cfg: Arc::new(cfg),
            link: Arc::new(tokio::sync::Mutex::new(None)),
            retry_said: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Connects once, within the call deadline of `cfg`, so that a wrong address or
    /// configuration shows at once (no retry). In TLS 1.3 the dispatcher judges our certificate
    /// after our side of the handshake is done: a refusal shows on the first call.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let within = cfg.call_timeout;
        Client::connect_within(cfg, within).await
    }

    /// [`Client::connect`] within `within` rather than the call deadline of `cfg`, which
    /// stays the deadline of each call: a caller that has been trying to connect for a while
    /// gives the last try what is left of its own wait, not its calls.
    pub async fn connect_within(
        cfg: ClientConfig,
        within: Duration,
    ) -> Result<Client, ClientError> {
        let client = Client::new(cfg);
        match tokio::time::timeout(within, client.current_link()).await {
            Ok(link) => link?,
            Err(_) => return Err(client.not_connected(within)),
        };
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
        // A timeout beyond the clock's range (`Duration::MAX` for "no timeout") waits as long
        // as tokio's own timers do.
        // A request no frame can hold is refused at once, not after connecting (or after a
        // whole deadline of trying to, with no dispatcher up).
        let least = frame::request_body_min_len(op.len(), payload.len());
        if least > self.cfg.io.max_frame {
            return Err(ClientError::TooLarge {
                size: least as u64,
                max: self.cfg.io.max_frame,
            });
        }
        let deadline = Instant::now()
            .checked_add(opts.timeout)
            .unwrap_or_else(|| Instant::now() + FAR_FUTURE);
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.slots.acquire()).await else {
            return Err(ClientError::Timeout(opts.timeout));
        };
        let mut backoff = FIRST_BACKOFF;
        // Why the last try failed, and whether any try may have reached the dispatcher: then
        // the call ends in "may or may not have run" whatever happens after.
        let mut last: Option<ClientError> = None;
        let mut maybe_sent = false;
        loop {
            let link = match tokio::time::timeout_at(deadline, self.current_link()).await {
                Ok(Ok(link)) => Some(link),
                Ok(Err(e)) if e.is_tls_refusal() => return Err(e),
                Ok(Err(e)) => {
                    let reason = match &e {
                        ClientError::Connect { reason, .. } => reason.clone(),
                        other => other.to_string(),
                    };
                    self.say_retry(
                        format_args!("cannot connect to {}: {reason}", self.cfg.addr),
                        deadline,
                    );
                    last = Some(e);
                    None
                }
                Err(_) => return Err(self.gave_up(last, maybe_sent, opts.timeout)),
            };
            if let Some(link) = link {
                let exchange = self.exchange(&link, op, &payload, deadline);
                match tokio::time::timeout_at(deadline, exchange).await {
                    Err(_) => return Err(ClientError::Timeout(opts.timeout)),
                    Ok(Ok(out)) => return Ok(out),
                    Ok(Err(Failure::Final(e))) => return Err(e),
                    Ok(Err(Failure::Lost)) if !opts.idempotent => {
                        return Err(ClientError::ConnectionLost);
                    }
                    Ok(Err(Failure::Lost)) => {
                        self.say_retry(
                            format_args!(
                                "the connection to {} broke with the request in progress; \
                                 sending it again (the op is idempotent)",
                                self.cfg.addr
                            ),
                            deadline,
                        );
                        maybe_sent = true;
                    }
                    Ok(Err(Failure::NotSent)) => {
                        self.say_retry(
                            format_args!(
                                "the connection to {} ended before the request was sent; \
                                 sending it again",
                                self.cfg.addr
                            ),
                            deadline,
                        );
                        last = Some(ClientError::NotSent);
                    }
                }
            }
            // Trouble that may pass: try again after a pause, while the deadline allows.
            let now = Instant::now();
            if now + backoff >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(self.gave_up(last, maybe_sent, opts.timeout));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Says, once until a connection is made again, that a call is trying again and for how
    /// long at most: a user waiting for the deadline learns why at once.
    fn say_retry(&self, why: std::fmt::Arguments<'_>, deadline: Instant) {
        if self.retry_said.swap(true, Ordering::Relaxed) {
            tracing::debug!(reason = %why, "trying again");
            return;
        }
        // INFO, not WARN: a planned restart of the dispatcher is no trouble of the client's.
        tracing::info!("{why}; trying again {}", for_up_to(deadline));
    }

    /// The error of a call whose deadline passed while it was still trying to connect.
    fn gave_up(
        &self,
        last: Option<ClientError>,
        maybe_sent: bool,
        within: Duration,
    ) -> ClientError {
        match last {
            _ if maybe_sent => ClientError::ConnectionLost,
            Some(e) => e,
            None => self.not_connected(within),
        }
    }

    fn not_connected(&self, within: Duration) -> ClientError {
        ClientError::Connect {
            addr: self.cfg.addr,
            reason: format!("not connected within {within:?}"),
        }
    }

    /// Sends the request on `link` and waits for its outcome.
    async fn exchange(
        &self,
        link: &Link,
        op: &str,
        payload: &Bytes,
        deadline: Instant,
    ) -> Result<Bytes, Failure> {
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        // The dispatcher gets the time this call has left, not the whole of it.
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = frame::encode_spliced(
            &RequestRef::Request {
                id,
                op,
                payload,
                timeout_ms: u32::try_from(left.as_millis().max(1)).unwrap_or(u32::MAX),
            },
            payload,
            self.cfg.io.max_frame,
        )
        .map_err(|e| {
            Failure::Final(match e {
                frame::FrameError::TooLarge { declared, max } => ClientError::TooLarge {
                    size: declared,
                    max,
                },
                e => ClientError::Request(e.to_string()),
            })
        })?;
        // The connection may have ended since it was handed to us (in TLS 1.3 the dispatcher's
        // verdict on our certificate comes after the handshake).
        let gone = || match link.refused.get() {
            Some(e) => Failure::Final(e.clone()),
            None => Failure::NotSent,
        };
        let Some(orx) = link.pending.register(id) else {
            return Err(gone());
        };
        // Dropped at the call's deadline, this future takes its waiter with it: the writer
        // drops a frame whose deadline has passed, and then no answer would ever remove it.
        let mut waiting = Waiting { link, id };
        if link
            .tx
            .send(Queued {
                id,
                deadline,
                frame,
            })
            .await
            .is_err()
        {
            return Err(gone());
        }
        let outcome = orx.await;
        // Answered, or the connection closed: the waiter is gone already.
        waiting.id = 0;
        match outcome {
            // The dispatcher is stopping and did not run it: try again on a new connection
            // (a restarted dispatcher), within the deadline, idempotent or not.
            Ok(Outcome::Done(Err(ClientError::Remote {
                code: ErrorCode::ShuttingDown,
                ..
            }))) => {
                link.draining.store(true, Ordering::Relaxed);
                Err(Failure::NotSent)
            }
            Ok(Outcome::Done(r)) => r.map_err(Failure::Final),
            Ok(Outcome::NotSent) => Err(Failure::NotSent),
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
        if let Some(l) = guard
            .as_ref()
            .filter(|l| !l.tx.is_closed() && !l.draining.load(Ordering::Relaxed))
        {
            return Ok(l.clone());
        }
        let (stream, _) = self
            .cfg
            .connector
            .connect(self.cfg.addr)
            .await
            .map_err(|e| ClientError::from_handshake(self.cfg.addr, e))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Arc::new(Link {
            tx,
            close: tokio_util::sync::CancellationToken::new(),
            task: Mutex::new(None),
            pending: InFlight::default(),
            next_id: AtomicU64::new(1),
            refused: OnceLock::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        // A resumed session's refusal comes without an alert (see `run_link`).
        let resumed = crate::tls::is_resumed(&stream).then(|| self.cfg.connector.clone());
        let task = tokio::spawn(run_link(
            link.clone(),
            stream,
            rx,
            self.cfg.io,
            self.cfg.addr,
            resumed,
        ));
        *link.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        *guard = Some(link.clone());
        self.retry_said.store(false, Ordering::Relaxed);
        Ok(link)
    }
}

/// How long a call may go on trying, for its log line: `for up to 12.5 s (...)`, or, for a
/// deadline beyond a day (no timeout), `until the call's deadline`.
pub fn for_up_to(deadline: Instant) -> String {
    let left = deadline.saturating_duration_since(Instant::now());
    if left > Duration::from_secs(86_400) {
        "until the call's deadline".to_string()
    } else {
        format!(
            "for up to {:.1} s (the call's deadline)",
            left.as_secs_f64()
        )
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

/// Owns the connection: a task of its own writes queued requests in batches (see
/// [`crate::connection::write_link`] for why apart), this one routes answers to their callers,
/// and when the connection ends every waiting call learns how. `resumed`: the connector, if
/// the handshake resumed a session.
async fn run_link(
    link: Arc<Link>,
    stream: ClientStream,
    rx: mpsc::Receiver<Queued>,
    io: IoLimits,
    addr: SocketAddr,
    resumed: Option<crate::tls::Connector>,
) {
    let (read_half, write_half) = tokio::io::split(stream);
    let mut conn = Connection::new(read_half, io);
    let stop = link.close.child_token();
    let writer = tokio::spawn(crate::connection::write_link(
        Connection::new(write_half, io),
        rx,
        None,
        {
            let link = link.clone();
            move || link.pending.len() > 1
        },
        stop.clone(),
    ));
    let mut closing_reason: Option<ClientError> = None;
    // Whether the dispatcher closed (`close_notify`) before sending anything at all.
    let mut closed_unheard = false;
    // Whether the dispatcher has answered anything yet: until it has, an alert is its verdict
    // on our certificate, sent once it has seen the end of our handshake.
    let mut answered = false;
    // One wait for cancellation for the whole loop, looked at only once it has woken us
    // (`shutdown::cancelled`): polling one every turn takes two locks, for every message.
    // `stop` ends with `close` and with a failed write.
    let mut cancelled = crate::shutdown::cancelled(&stop);
    loop {
        tokio::select! {
            _ = &mut cancelled => {
                if !link.close.is_cancelled() && !answered {
                    // A write failed. The dispatcher may have refused us and closed before
                    // our request arrived; its alert may still be waiting to be read.
                    let read = tokio::time::timeout(ALERT_GRACE, conn.read_message()).await;
                    match read {
                        Ok(Err(e)) => closing_reason = refusal(&e, addr),
                        // Or it closed without a word (a resumed session refused, below).
                        Ok(Ok(None)) => closed_unheard = !answered,
                        _ => {}
                    }
                }
                break;
            }
            r = conn.read_message() => match r {
                Ok(Some(Message::Reply(r))) => {
                    answered = true;
                    link.pending.complete(r.id, Outcome::Done(Ok(r.payload)));
                }
                Ok(Some(Message::Error(e))) if e.id == 0 => {
                    // The dispatcher is closing the connection and says why.
                    closing_reason = Some(ClientError::Remote { code: e.code, message: e.message });
                    break;
                }
                Ok(Some(Message::Error(e))) => {
                    answered = true;
                    link.pending.complete(e.id, Outcome::Done(Err(ClientError::Remote { code: e.code, message: e.message })));
                }
                Err(e) if !answered => {
                    closing_reason = refusal(&e, addr);
                    break;
                }
                Ok(None) => {
                    closed_unheard = !answered;
                    break;
                }
                Ok(Some(_)) | Err(_) => break,
            },
        }
    }
    drop(cancelled);
    stop.cancel();
    let (mut rx, held, mut writer) = match writer.await {
        Ok(end) => (end.rx, end.held, Some(end.conn)),
        // The writer panicked: the queue went with it, so nothing counts as never sent.
        Err(_) => (mpsc::channel(1).1, Vec::new(), None),
    };
    // A refusal of our certificate is final for every call on this connection, written or
    // not; after other endings, requests that never left are sent again.
    let refusal = closing_reason.clone().filter(ClientError::is_tls_refusal);
    if let Some(e) = &refusal {
        let _ = link.refused.set(e.clone());
    }
    // A resumed session closed with a bare `close_notify` before any frame: the dispatcher
    // refused the identity of the ticket after the handshake (its certificate has expired
    // since, say; PROTOCOL.md §1) and read nothing. Its other tickets would meet the same
    // refusal, each bringing new ones, so that a call would never learn why and would end,
    // at its deadline, as one that may have run. The tickets are forgotten and the calls
    // try again: the full handshake is refused with the alert that says why, or served.
    let resumption_refused = match &resumed {
        Some(connector) if closed_unheard => {
            connector.forget_tickets();
            true
        }
        _ => false,
    };
    // Closed by `Client::close`: the calls in flight fail, as it says, rather than being
    // sent again on a connection of their own that nothing would close.
    let closed_by_us = link.close.is_cancelled();
    link.pending.close(
        &mut rx,
        held,
        || match &refusal {
            Some(e) => Outcome::Closed(e.clone()),
            None if closed_by_us => Outcome::Closed(ClientError::NotSent),
            None => Outcome::NotSent,
        },
        || match &closing_reason {
            None if closed_by_us => Outcome::Closed(ClientError::ConnectionLost),
            // The dispatcher stopped and said it answered every request it read: the others
            // were never read and did not run, so they may be sent again, idempotent or not.
            Some(ClientError::Remote {
                code: ErrorCode::ShuttingDown,
                ..
            }) => Outcome::NotSent,
            // Closed with requests still running (a drain that ran out) or for slowness: they
            // may have run, as after a broken connection; an idempotent call tries again.
            Some(ClientError::Remote {
                code: ErrorCode::Timeout,
                ..
            }) => Outcome::Lost,
            Some(e) => Outcome::Closed(e.clone()),
            None if resumption_refused => Outcome::NotSent,
            None => Outcome::Lost,
        },
    );
    if let Some(w) = writer.as_mut() {
        w.close(None).await;
    }
}

/// The dispatcher's refusal of our certificate, if `e` is the alert that says so.
fn refusal(e: &ConnError, addr: SocketAddr) -> Option<ClientError> {
    match e {
        ConnError::Io(io) => crate::tls::alert_received(io)
            .map(|alert| ClientError::RefusedByDispatcher { addr, alert }),
        _ => None,
    }
}

/// Checks that `addr` has the form `IP:PORT` or `HOST:PORT` without resolving it, so that a
/// command line can be refused as a usage error while a name that does not resolve is a
/// connection failure.
pub fn check_addr(addr: &str) -> Result<String, String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(addr.to_owned());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} has no port: give HOST:PORT"));
    };
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{addr:?}: an IPv6 address needs brackets, as in [2001:db8::1]:2222"
        ));
    }
    if host.is_empty() {
        return Err(format!("{addr:?} has no host: give HOST:PORT"));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{addr:?}: the port must be a number from 0 to 65535"
        ));
    }
    Ok(addr.to_owned())
}

/// Parses `HOST:PORT` for `--connect`: an IP address, or a host name resolved once, now. Of
/// the name's addresses the first IPv4 one is taken if there is one (the default listeners
/// are IPv4), else the first.
pub fn resolve_addr(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    check_addr(addr)?;
    let all: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

#[cfg(test)]
mod tests;
