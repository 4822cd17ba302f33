//! The dispatcher: accepts clients and the watchdog over mTLS, enforces the ACL, and forwards
//! each request with a fresh token to the least-loaded available worker.
//!
//! Path of a request: [`crate::session`] reads it and starts a task; `Dispatcher::route`
//! checks the op and the ACL, picks a worker ([`pool::Pool`]), forwards, and retries on
//! another worker when the first one went away — always for requests that never left, and for
//! idempotent ops also when the worker may have started them. Every request has a deadline and
//! leaves one audit line (target `securesrv::audit`) with client, op, worker, outcome and
//! duration. Heartbeats from the watchdog are answered by the same request tasks.

pub mod pool;

use crate::config::Config;
use crate::connection::{Connection, IoLimits};
use crate::identity::{Role, SpiffeId};
use crate::message::Bytes;
use crate::message::{ErrorCode, ErrorReply, Message, Pong, Reply, Request};
use crate::server::{self, ConnectionHandler, ListenerLimits, Peer};
use crate::session::{self, Next, Placement};
use crate::tls::{Acceptor, ServerStream, TlsConfigError, TlsMaterial};
use crate::token::Minter;
use pool::{ForwardError, Pool};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Attempts for a request whose worker went away after it was sent (idempotent ops only):
/// one retry, so that a request that crashes workers cannot take them all down in turn.
const MAX_LOST_ATTEMPTS: usize = 2;
/// Attempts in all (a request that never left can always be sent again).
const MAX_ATTEMPTS: usize = 6;

/// A connected client: its identity, and the same as text (formatted once per connection,
/// not per request).
pub struct Caller {
    id: SpiffeId,
    text: Arc<str>,
    /// The identity's flow on the worker links, where identities take turns (see
    /// `connection::write_link`): one per identity, whatever the connection.
    flow: u64,
    /// The identity's budget for payloads waiting for a worker link
    /// ([`crate::server::IdentitySlots::queued`]).
    queued: Arc<tokio::sync::Semaphore>,
    peer: std::net::SocketAddr,
    /// Whether this connection runs inside the server's `conn` span (the log filter may
    /// disable it); decided once per connection, for the audit records.
    in_conn_span: bool,
}

impl Caller {
    /// The audit line of one of this client's requests (DESIGN: every request has one).
    fn audit(
        &self,
        op: String,
        worker: Option<Arc<str>>,
        outcome: Result<(), (ErrorCode, String)>,
        duration_us: u64,
    ) {
        crate::audit::record(|| crate::audit::Record {
            at: std::time::SystemTime::now(),
            peer: self.peer,
            in_conn_span: self.in_conn_span,
            client: self.text.clone(),
            op: match crate::identity::op_for_log(&op) {
                std::borrow::Cow::Borrowed(_) => op,
                std::borrow::Cow::Owned(printable) => printable,
            },
            worker,
            outcome,
            duration_us,
        });
    }

    /// Audits a request answered with `refusal` before it reached a worker, and returns it.
    fn refused(&self, op: String, refusal: Message) -> Message {
        if let Message::Error(e) = &refusal {
            self.audit(op, None, Err((e.code, e.message.clone())), 0);
        }
        refusal
    }
}

/// The dispatcher's shared state.
pub struct Dispatcher {
    cfg: Arc<Config>,
    pool: Arc<Pool>,
    running: AtomicU32,
}

/// Errors starting a dispatcher.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    /// Certificates or keys could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsConfigError),
    /// The token key file could not be loaded.
    #[error("{0}")]
    Keys(#[from] crate::certs::CertError),
    /// A configured identity is invalid.
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
}

impl Dispatcher {
    /// Loads the dispatcher's certificate, key and master token key from `cfg.certs_dir`.
    pub fn load(cfg: Arc<Config>) -> Result<(Arc<Self>, TlsMaterial), DispatcherError> {
        let me = SpiffeId::dispatcher(&cfg.trust_domain)?;
        let material = TlsMaterial::load_from_dir(&cfg.certs_dir, &me)?;
        let master =
            crate::certs::load_live_key_file(&cfg.certs_dir.join(crate::certs::MASTER_TOKEN_KEY))?;
        let workers = cfg
            .worker_addresses()
            .into_iter()
            .map(|(id, addr)| Ok((id, SpiffeId::worker(&cfg.trust_domain, id)?, addr)))
            .collect::<Result<Vec<_>, crate::identity::IdentityError>>()?;
        let audiences: Vec<SpiffeId> = workers.iter().map(|w| w.1.clone()).collect();
        let minter = Minter::new(master.current(), &audiences, cfg.token.lifetime_ms)
            .with_previous(master.entries().get(1));
        let pool = Arc::new(Pool::new(&cfg, workers, minter));
        Ok((
            Arc::new(Dispatcher {
                cfg,
                pool,
                running: AtomicU32::new(0),
            }),
            material,
        ))
    }

    /// The worker pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Starts one link task per worker on `tracker`.
    pub fn start_links(
        &self,
        material: &TlsMaterial,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), TlsConfigError> {
        let base = self.cfg.limits.io();
        let io = IoLimits {
            // The dispatcher pings every link, so a worker link is never idle for long; the
            // ping misses decide liveness, not the idle timer.
            idle_timeout: Duration::from_secs(24 * 3600),
            max_frame: base.max_frame + crate::frame::LINK_HEADROOM,
            ..base
        };
        for slot in self.pool.slots() {
            let connector =
                material.connector(&slot.identity, self.cfg.limits.handshake_timeout())?;
            tracker.spawn(self.pool.clone().maintain(
                slot.clone(),
                connector,
                io,
                Duration::from_millis(self.cfg.dispatcher.worker_ping_interval_ms),
                Duration::from_millis(self.cfg.dispatcher.reconnect_backoff_max_ms),
                shutdown.clone(),
            ));
        }
        Ok(())
    }

    async fn handle_request(
        self: Arc<Self>,
        client: Arc<Caller>,
        req: Request,
        info: crate::config::OpInfo,
    ) -> Message {
        let started = Instant::now();
        let running = crate::session::Running::enter(&self.running);
        let sent_to = AtomicU32::new(0);
        let mut unfinished = Unfinished {
            client: &client,
            op: &req.op,
            started,
            pool: &self.pool,
            sent_to: &sent_to,
            armed: true,
        };
        let (worker, mut result) = self.route(&client, &req, info, started, &sent_to).await;
        unfinished.armed = false;
        drop(unfinished);
        drop(running);
        // A deadline this dispatcher shortened, and that ran out (not, say, a job's own
        // timeout): the client is told why it was not the one it asked for. The worker's
        // deadline is a little before the dispatcher's (it was told the time left).
        let max_ms = self.cfg.limits.max_request_timeout_ms;
        if let (Err((ErrorCode::Timeout, message)), Some(asked)) = (&mut result, req.timeout_ms) {
            if u64::from(asked) > max_ms
                && started.elapsed() + CAP_TOLERANCE >= Duration::from_millis(max_ms)
            {
                message.push_str(&format!(
                    " (asked for {asked} ms; this dispatcher allows at most {max_ms} ms, \
                     limits.max_request_timeout_ms)"
                ));
            }
        }
        // An answer too large for the client's frames (a worker configured with a larger
        // output cap) is refused here, so that the audit line says what the client gets.
        let max = self.cfg.limits.max_frame_bytes;
        if let Ok(payload) = &result {
            let len = crate::frame::reply_body_len(req.id, payload.len());
            if len > max {
                result = Err((
                    ErrorCode::TooLarge,
                    format!(
                        "answer of {} bytes does not fit a frame of {max} bytes",
                        payload.len()
                    ),
                ));
            }
        }
        let micros = started.elapsed().as_micros() as u64;
        let id = req.id;
        client.audit(
            req.op,
            worker.as_ref().map(|s| s.identity_text.clone()),
            match &result {
                Ok(_) => Ok(()),
                Err((code, message)) => Err((*code, message.clone())),
            },
            micros,
        );
        match result {
            Ok(payload) => Message::Reply(Reply { id, payload }),
            Err((code, message)) => Message::Error(ErrorReply { id, code, message }),
        }
    }

    /// The op `op`, if it exists and `client` may call it; else the refusal, which needs
    /// nothing but the configuration.
    fn op_for(
        &self,
        client: &Caller,
        op: &str,
    ) -> Result<crate::config::OpInfo, (ErrorCode, String)> {
        let Some(info) = self.cfg.op_info(op) else {
            return Err((
                ErrorCode::UnknownOp,
                if crate::config::valid_op_name(op) {
                    format!("unknown op {op}")
                } else {
                    "unknown op (not an op name: 1-64 of a-z 0-9 _ - .)".to_string()
                },
            ));
        };
        if !self.cfg.acl_allows(&client.id, op) {
            return Err((
                ErrorCode::Denied,
                format!("{} may not call {op}", client.text),
            ));
        }
        Ok(info)
    }

    /// Worker choice, forward, retry, for an op `client` may call ([`Dispatcher::op_for`]).
    /// Returns the worker that answered (if any).
    /// `started` is when the dispatcher began to handle the request: its deadline counts
    /// from then. `sent_to` gets the id of each worker the request is sent to, for the audit
    /// line of a request dropped before its answer came.
    async fn route(
        &self,
        client: &Caller,
        req: &Request,
        info: crate::config::OpInfo,
        started: Instant,
        sent_to: &AtomicU32,
    ) -> (Option<Arc<pool::Slot>>, Result<Bytes, (ErrorCode, String)>) {
        let cfg = &self.cfg;
        let timeout_ms = req
            .timeout_ms
            .map_or(cfg.limits.request_timeout_ms, u64::from)
            .clamp(1, cfg.limits.max_request_timeout_ms);
        let deadline = started + Duration::from_millis(timeout_ms);
        let wait = Duration::from_millis(cfg.dispatcher.unavailable_wait_ms);
        // Links (not workers) a retry may not go back to: a worker that was stopping, or lost
        // the request, takes it again once it is back on a new link.
        let mut exclude: Vec<pool::Excluded> = Vec::new();
        let mut lost = 0;
        let mut last_worker = None;
        // Workers that refused our token: if no worker takes the request, that is why.
        let mut token_refused_by: Vec<u32> = Vec::new();
        // A worker that refused the request `overloaded` (it did not run there): the request
        // goes to another worker that can take it now, and if none can, the client is told
        // at once rather than after a wait that would only add to the load.
        let mut overloaded: Option<(ErrorCode, String)> = None;
        // The time now, read again only after something may have waited: the clock is read
        // a handful of times per request, and each reading counts at small sizes.
        let mut now = started;
        // A worker switched to the previous token key gives the attempt back: each link
        // switches once, and a request sent alone after a rotation may meet every worker
        // switching in turn.
        let mut attempts = MAX_ATTEMPTS;
        let mut attempt = 0;
        while attempt < attempts {
            if attempt > 0 {
                now = Instant::now();
            }
            attempt += 1;
            let picked = match self.pool.pick(&exclude) {
                Some(p) => Some(p),
                None if overloaded.is_some() => None,
                None => {
                    let wait_until = (now + wait).min(deadline);
                    let p = self.pool.pick_or_wait(&exclude, wait_until).await;
                    now = Instant::now();
                    p
                }
            };
            let Some(picked) = picked else {
                let why = if let Some(refusal) = overloaded {
                    refusal
                } else if !token_refused_by.is_empty() {
                    token_refused_error()
                } else if now >= deadline {
                    (
                        ErrorCode::Timeout,
                        "deadline passed while waiting for a worker".to_string(),
                    )
                } else {
                    (
                        ErrorCode::Unavailable,
                        format!("no worker available within {} ms", wait.as_millis()),
                    )
                };
                return (last_worker, Err(why));
            };
            let slot = picked.slot.clone();
            let here = picked.link.excluded(&slot);
            last_worker = Some(slot.clone());
            sent_to.store(slot.id, Ordering::Relaxed);
            // Decided here, so that a refusal is judged by the key its token was signed with:
            // requests sent before the worker's first refusal were signed with the current key,
            // and are sent again once the link has switched.
            let previous_key = slot.on_previous_key(&picked.link);
            match self
                .pool
                .forward(&picked, client, req, now, deadline, previous_key)
                .await
            {
                Ok(out) => return (Some(slot.clone()), Ok(out)),
                Err(ForwardError::NotSent) => continue,
                Err(ForwardError::Remote(ErrorCode::ShuttingDown, _)) => {
                    // Elsewhere, or to this worker once it is back (on a new link): worth a
                    // wait for a worker, whatever another one said before.
                    exclude.push(here);
                    overloaded = None;
                }
                Err(ForwardError::Expired) => {
                    if let Some(requests) = slot.expired_tokens.hit() {
                        warn!(worker = slot.id, requests, op = %req.op, "worker read requests after their tokens expired; sending them elsewhere");
                    }
                    // Elsewhere if another worker can take it; otherwise back to this one,
                    // which is reading again (it answered), with a fresh token.
                    exclude.push(here);
                    if !self.pool.can_pick(&exclude) {
                        exclude.pop();
                    }
                }
                Err(ForwardError::Lost) => {
                    lost += 1;
                    if !info.idempotent {
                        return (
                            Some(slot.clone()),
                            Err((
                                ErrorCode::WorkerLost,
                                format!(
                                    "worker {} went away while running this non-idempotent request; it may or may not have run",
                                    slot.id
                                ),
                            )),
                        );
                    }
                    if lost >= MAX_LOST_ATTEMPTS {
                        return (
                            Some(slot.clone()),
                            Err((
                                ErrorCode::WorkerLost,
                                format!(
                                    "request lost on {lost} workers in turn; not retried again"
                                ),
                            )),
                        );
                    }
                    if let Some(requests) = slot.lost_retries.hit() {
                        warn!(worker = slot.id, requests, op = %req.op, "worker lost mid-request; retrying idempotent requests");
                    }
                    exclude.push(here);
                }
                Err(ForwardError::Timeout) => {
                    return (
                        Some(slot.clone()),
                        Err((
                            ErrorCode::Timeout,
                            format!("no answer within {timeout_ms} ms"),
                        )),
                    );
                }
                Err(ForwardError::Remote(ErrorCode::InvalidToken, _))
                    if !previous_key && self.pool.previous_key_usable() =>
                {
                    // A worker not restarted since `certs rotate-token-key` knows only the
                    // previous key, which workers accept until its window ends: sign its
                    // tokens with that one until it restarts, and send this request again.
                    if !slot.on_previous_key(&picked.link) {
                        slot.use_previous_key(&picked.link);
                        attempts += 1;
                        warn!(
                            worker = slot.id,
                            "worker refused a token signed with the newest token key; signing its tokens with the previous key until it restarts (after rotate-token-key, restart every worker before the key's window ends)"
                        );
                    }
                }
                Err(ForwardError::Remote(ErrorCode::InvalidToken, message)) => {
                    // A token this dispatcher minted for that worker a moment ago: nothing the
                    // client did. Usually the token keys are out of step (a worker still
                    // running on the key before `certs rotate-token-key`). The request did not
                    // run there, so it may go to another worker.
                    // At most a line a second per worker: with stale keys it is every request.
                    if let Some(refusals) = slot.token_refusals.hit() {
                        warn!(
                            worker = slot.id,
                            refusals,
                            op = %req.op,
                            reason = %crate::identity::quoted(&message, 80),
                            "worker refused the dispatcher's token; token keys out of step? (after rotate-token-key, restart every worker, then the dispatcher)"
                        );
                    }
                    exclude.push(here);
                    if !token_refused_by.contains(&slot.id) {
                        token_refused_by.push(slot.id);
                    }
                    if token_refused_by.len() >= self.pool.slots().len() {
                        return (Some(slot.clone()), Err(token_refused_error()));
                    }
                }
                Err(ForwardError::Remote(ErrorCode::Overloaded, _)) => {
                    // The worker runs as many requests as it takes, counting some the
                    // dispatcher no longer waits for (their client's deadline passed first,
                    // or a dispatcher before a restart sent them), or its replay cache is
                    // full. Its message names its limits, which are not the client's to know.
                    exclude.push(here);
                    overloaded = Some((
                        ErrorCode::Overloaded,
                        "the workers are busy; try again later".into(),
                    ));
                }
                Err(ForwardError::Remote(code, message)) => {
                    return (Some(slot.clone()), Err((code, message)));
                }
                Err(e @ ForwardError::Token(_)) => {
                    warn!(error = %e, "cannot forward");
                    return (
                        Some(slot.clone()),
                        Err((ErrorCode::Internal, "internal error".into())),
                    );
                }
            }
        }
        let why = if let Some(refusal) = overloaded {
            refusal
        } else if !token_refused_by.is_empty() {
            token_refused_error()
        } else {
            (
                ErrorCode::Unavailable,
                "no worker could take the request".into(),
            )
        };
        (last_worker, Err(why))
    }

    /// Whether `identity`, its request just admitted, holds more than half the capacity of
    /// the workers linked now. The default per-identity limit is half the capacity of every
    /// configured worker, so with workers down one identity could take all that is left and
    /// keep every other client out. An explicit `limits.max_in_flight_per_identity` stands as
    /// the operator set it. Workers are counted only once the identity holds more than half of
    /// one worker's capacity, so the usual request does not look at the pool.
    fn over_share(&self, identity: &crate::server::IdentitySlots) -> bool {
        if self.cfg.limits.max_in_flight_per_identity.is_some() {
            return false;
        }
        let per_worker = self.cfg.dispatcher.max_in_flight_per_worker;
        let held = identity
            .limit
            .saturating_sub(identity.slots.available_permits());
        held > (per_worker / 2).max(1) && held > self.identity_share(per_worker)
    }

    /// Half the capacity of the workers linked now (of one, when none is).
    fn identity_share(&self, per_worker: usize) -> usize {
        (self.pool.linked().max(1).saturating_mul(per_worker) / 2).max(1)
    }

    fn share_refusal(&self, identity: &crate::server::IdentitySlots, id: u64) -> Message {
        let limit = self.identity_share(self.cfg.dispatcher.max_in_flight_per_worker);
        let message = format!(
            "too many requests in flight for this identity while workers are down (limit {limit})"
        );
        if let Some(refused) = identity.refusals.hit() {
            warn!(refused, reason = %message, "refusing requests: limit reached");
        }
        Message::Error(crate::message::ErrorReply {
            id,
            code: ErrorCode::Overloaded,
            message,
        })
    }

    fn pong(&self, nonce: Vec<u8>) -> Message {
        Message::Pong(Pong {
            nonce,
            in_flight: self.running.load(Ordering::Relaxed),
            workers_available: Some(self.pool.available() as u32),
        })
    }
}

/// Audits a request whose handling is dropped before it ended: the dispatcher stopped, and
/// the request was still running when its drain period ran out (its client, if still
/// connected, is told id-0 `timeout`). Without it such a request left no audit line.
struct Unfinished<'a> {
    client: &'a Caller,
    op: &'a str,
    started: Instant,
    pool: &'a Pool,
    /// The worker it was last sent to (0: none).
    sent_to: &'a AtomicU32,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Where it may have run, if it was sent anywhere.
            let id = self.sent_to.load(Ordering::Relaxed);
            let worker = self
                .pool
                .slots()
                .iter()
                .find(|s| id != 0 && s.id == id)
                .map(|s| s.identity_text.clone());
            self.client.audit(
                self.op.to_string(),
                worker,
                Err((
                    ErrorCode::Timeout,
                    "the dispatcher stopped before the answer came; the request may have run"
                        .into(),
                )),
                self.started.elapsed().as_micros() as u64,
            );
        }
    }
}

/// How much sooner than the dispatcher's deadline a timeout may come and still be that
/// deadline's: a worker is told the time left rounded down to a millisecond, so its deadline is
/// at most 1 ms before the dispatcher's; a little more for the clock readings in between.
const CAP_TOLERANCE: Duration = Duration::from_millis(5);

/// What a client is told when no worker accepted the tokens minted for it: the dispatcher's
/// fault, not the client's (`invalid_token` is a worker link's code).
fn token_refused_error() -> (ErrorCode, String) {
    (
        ErrorCode::Internal,
        "no worker accepted the dispatcher's token (see the dispatcher's log)".into(),
    )
}

#[derive(Clone)]
struct Handler {
    dispatcher: Arc<Dispatcher>,
    drain: Duration,
    max_in_flight: usize,
}

impl ConnectionHandler for Handler {
    async fn serve(&self, conn: Connection<ServerStream>, peer: Peer, shutdown: CancellationToken) {
        let d = self.dispatcher.clone();
        let client = Arc::new(Caller {
            text: peer.id.to_string().into(),
            flow: peer.identity_slots.flow,
            queued: peer.identity_slots.queued.clone(),
            id: peer.id,
            peer: peer.addr,
            in_conn_span: tracing::Span::current()
                .metadata()
                .is_some_and(|m| m.name() == "conn"),
        });
        session::drive(
            conn,
            shutdown,
            session::RequestLimits {
                per_connection: self.max_in_flight,
                identity: peer.identity_slots,
                drain: self.drain,
                leftovers: peer.leftovers,
            },
            // Every request is audited, those refused here included.
            move |msg, s| match msg {
                Message::Request(req) if req.id == 0 => Next::Close(Some(client.refused(
                    req.op,
                    Message::connection_error(
                        ErrorCode::BadRequest,
                        "request id 0 is reserved for connection-level errors",
                    ),
                ))),
                Message::Request(req) if client.id.role() == Role::Client => {
                    // Admitted first, as before (a stopping connection says `shutting_down`,
                    // a full one `overloaded`), then the op and the ACL, refused at once: with
                    // the other refusals of its turn, and paced with them.
                    let admitted = match s.admit(req.id, req.payload.len()) {
                        Ok(admitted) => admitted,
                        Err(refusal) => return Next::Reply(client.refused(req.op, refusal)),
                    };
                    let info = match d.op_for(&client, &req.op) {
                        Ok(info) => info,
                        Err((code, message)) => {
                            drop(admitted);
                            return Next::Reply(client.refused(
                                req.op,
                                Message::Error(ErrorReply {
                                    id: req.id,
                                    code,
                                    message,
                                }),
                            ));
                        }
                    };
                    if d.over_share(s.identity()) {
                        drop(admitted);
                        return Next::Reply(
                            client.refused(req.op, d.share_refusal(s.identity(), req.id)),
                        );
                    }
                    s.run_admitted(
                        admitted,
                        Placement::Inline,
                        d.clone().handle_request(client.clone(), req, info),
                    )
                }
                Message::Request(req) => Next::Reply(client.refused(
                    req.op,
                    Message::Error(ErrorReply {
                        id: req.id,
                        code: ErrorCode::Denied,
                        message: format!("{} may not send requests", client.text),
                    }),
                )),
                Message::Ping(p) => {
                    let d = d.clone();
                    s.ping(p.nonce, Placement::Inline, move |nonce| d.pong(nonce))
                }
                other => Next::Close(Some(Message::connection_error(
                    ErrorCode::BadRequest,
                    format!("a dispatcher does not accept {} messages", other.kind()),
                ))),
            },
        )
        .await;
    }
}

/// Serves `dispatcher` on `listener` until `shutdown`, then lets connections drain. The worker
/// links are started separately ([`Dispatcher::start_links`]) so that they outlive the drain.
pub async fn run(
    dispatcher: Arc<Dispatcher>,
    listener: TcpListener,
    acceptor: Acceptor,
    shutdown: CancellationToken,
) {
    let cfg = dispatcher.cfg.clone();
    let handler = Handler {
        dispatcher,
        drain: cfg.drain_period(),
        max_in_flight: cfg.limits.max_in_flight_per_connection,
    };
    let mut limits =
        ListenerLimits::from_config(&cfg.limits, cfg.dispatcher_in_flight_per_identity());
    limits.max_in_flight_bytes_per_identity = cfg.limits.max_in_flight_bytes_per_identity;
    limits.refusals_per_sec_per_identity = Some(cfg.limits.max_refusals_per_sec_per_identity);
    // A link to each worker (and one more while it is redialled).
    let links = u64::try_from(2 * cfg.worker_addresses().len()).unwrap_or(u64::MAX);
    limits.other_fds = server::FD_RESERVE.saturating_add(links);
    server::serve(
        listener,
        acceptor,
        limits,
        handler,
        (shutdown.clone(), shutdown),
        cfg.drain_period(),
    )
    .await;
}
