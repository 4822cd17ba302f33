//! The worker: accepts the dispatcher and the watchdog over mTLS, checks the request token of
//! every forwarded request, re-checks the ACL from the token, runs the op and answers.
//!
//! Every forwarded request and every heartbeat goes through the same path: a task started by
//! the connection's request loop ([`crate::session`]) on the worker's runtime, so a worker whose
//! accept loop lives but whose request machinery is stuck stops answering heartbeats too.
//! The dispatcher writes the audit line of every request; the worker adds its own (target
//! `securesrv::audit`) for each one it refuses or that fails (a refused token also gets a WARN
//! `token refused` line), and for successes only at debug level.

pub mod jobs;
pub mod ops;

use crate::config::Config;
use crate::connection::Connection;
use crate::identity::{Role, SpiffeId};
use crate::message::Bytes;
use crate::message::{ErrorCode, ErrorReply, Forward, Message, Pong, Reply};
use crate::server::{self, ConnectionHandler, ListenerLimits, Peer};
use crate::session::{self, Next, Placement};
use crate::tls::{Acceptor, ServerStream, TlsConfigError, TlsMaterial};
use crate::token::{KeyFile, Verifier, VerifierLimits};
use ops::{OpRegistry, OpRequest};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// One worker's state, shared by its connections.
pub struct Worker {
    me: SpiffeId,
    cfg: Arc<Config>,
    verifier: Verifier,
    ops: OpRegistry,
    /// Requests running now (reported in pongs).
    running: AtomicU32,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("me", &self.me)
            .field("ops", &self.ops)
            .finish_non_exhaustive()
    }
}

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Certificates or keys could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsConfigError),
    /// The token key file could not be loaded.
    #[error("{0}")]
    Keys(#[from] crate::certs::CertError),
    /// Bad worker id.
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
}

impl Worker {
    /// A worker with identity `me`, token keys `keys` and ops `ops`.
    pub fn new(me: SpiffeId, cfg: Arc<Config>, keys: &KeyFile, ops: OpRegistry) -> Self {
        let verifier = Verifier::new(
            &me,
            keys,
            VerifierLimits {
                max_lifetime_ms: cfg.token.lifetime_ms,
                skew_ms: cfg.token.clock_skew_ms,
                replay_capacity: cfg.token.replay_cache_entries,
            },
        );
        Worker {
            me,
            cfg,
            verifier,
            ops,
            running: AtomicU32::new(0),
        }
    }

    /// Loads worker `id`'s certificate, key and token key file from `cfg.certs_dir`.
    pub fn load(
        id: u32,
        cfg: Arc<Config>,
        ops: OpRegistry,
    ) -> Result<(Self, TlsMaterial), WorkerError> {
        let me = SpiffeId::worker(&cfg.trust_domain, id)?;
        let material = TlsMaterial::load_from_dir(&cfg.certs_dir, &me)?;
        let keys = crate::certs::load_live_key_file(&crate::certs::worker_token_path(
            &cfg.certs_dir,
            &me,
        ))?;
        Ok((Worker::new(me, cfg, &keys, ops), material))
    }

    /// This worker's identity.
    pub fn identity(&self) -> &SpiffeId {
        &self.me
    }

    async fn handle_forward(self: Arc<Self>, f: Forward) -> Message {
        let started = Instant::now();
        let id = f.id;
        let op = f.op.clone();
        let running = crate::session::Running::enter(&self.running);
        let (client, result) = self.execute(f).await;
        drop(running);
        let micros = started.elapsed().as_micros() as u64;
        match result {
            Ok(payload) => {
                // The dispatcher writes the audit line of every request; the worker adds its
                // own for refusals (below), and for successes only at debug level.
                debug!(target: "securesrv::audit", client = %client, op = %op, worker = %self.me, outcome = %"ok", duration_us = micros, "request");
                Message::Reply(Reply { id, payload })
            }
            Err((code, message)) => {
                info!(target: "securesrv::audit", client = %client, op = %crate::identity::op_for_log(&op), worker = %self.me, outcome = %code, reason = %crate::audit::reason(&message), duration_us = micros, "request");
                Message::Error(ErrorReply { id, code, message })
            }
        }
    }

    /// Token, ACL, op, deadline. Returns the client identity for the audit line.
    async fn execute(&self, f: Forward) -> (String, Result<Bytes, (ErrorCode, String)>) {
        let claims = match self
            .verifier
            .verify(&f.token, &f.op, &f.payload, crate::token::now_ms())
        {
            Ok(c) => c,
            Err(e) => {
                let why = e.to_string();
                warn!(target: "securesrv::audit", op = %crate::identity::op_for_log(&f.op), reason = %crate::audit::reason(&why), "token refused");
                let code = match e {
                    crate::token::TokenError::ReplayCacheFull => ErrorCode::Overloaded,
                    _ => ErrorCode::InvalidToken,
                };
                return (
                    "unverified".into(),
                    Err((code, format!("token refused: {e}"))),
                );
            }
        };
        let client = claims.client;
        let Ok(client_id) = client.parse::<SpiffeId>() else {
            return (
                client,
                Err((
                    ErrorCode::InvalidToken,
                    "token names no valid client".into(),
                )),
            );
        };
        if !self.cfg.acl_allows(&client_id, &claims.op) {
            return (
                client,
                Err((
                    ErrorCode::Denied,
                    format!("{client_id} may not call {}", claims.op),
                )),
            );
        }
        let Some(handler) = self.ops.get(&f.op) else {
            return (
                client,
                Err((ErrorCode::UnknownOp, format!("no op {}", f.op))),
            );
        };
        let time_left = Duration::from_millis(
            u64::from(f.timeout_ms).min(self.cfg.limits.max_request_timeout_ms),
        );
        let req = OpRequest {
            payload: f.payload,
            client: client.clone(),
            time_left,
        };
        let result = match tokio::time::timeout(time_left, handler.call(req)).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err((e.code(), e.to_string())),
            Err(_) => Err((ErrorCode::Timeout, "deadline passed while running".into())),
        };
        (client, result)
    }

    fn pong(&self, nonce: Vec<u8>) -> Message {
        Message::Pong(Pong {
            nonce,
            in_flight: self.running.load(Ordering::Relaxed),
            workers_available: None,
        })
    }
}

/// The worker's connection handler.
#[derive(Clone)]
struct Handler {
    worker: Arc<Worker>,
    drain: Duration,
    max_in_flight: usize,
}

impl ConnectionHandler for Handler {
    async fn serve(&self, conn: Connection<ServerStream>, peer: Peer, shutdown: CancellationToken) {
        let worker = self.worker.clone();
        let role = peer.id.role();
        session::drive(
            conn,
            shutdown,
            session::RequestLimits {
                per_connection: self.max_in_flight,
                identity: peer.identity_slots.clone(),
                drain: self.drain,
                leftovers: peer.leftovers.clone(),
            },
            move |msg, s| match msg {
                Message::Forward(f) if f.id == 0 => Next::Close(Some(Message::connection_error(
                    ErrorCode::BadRequest,
                    "forward id 0 is reserved for connection-level errors",
                ))),
                Message::Forward(f) if role == Role::Dispatcher => {
                    let (id, len) = (f.id, f.payload.len());
                    s.start(id, Placement::Task, len, worker.clone().handle_forward(f))
                }
                Message::Forward(f) => Next::Reply(Message::Error(ErrorReply {
                    id: f.id,
                    code: ErrorCode::Denied,
                    message: "only the dispatcher may forward requests".into(),
                })),
                Message::Ping(p) => {
                    let w = worker.clone();
                    s.ping(p.nonce, Placement::Task, move |nonce| w.pong(nonce))
                }
                other => Next::Close(Some(Message::connection_error(
                    ErrorCode::BadRequest,
                    format!("a worker does not accept {} messages", other.kind()),
                ))),
            },
        )
        .await;
    }
}

/// Serves `worker` on `listener` until `shutdown`, then lets connections drain; then kills the
/// process groups of the jobs still running.
pub async fn run(
    worker: Arc<Worker>,
    listener: TcpListener,
    acceptor: Acceptor,
    shutdown: CancellationToken,
) {
    let accepting = shutdown.clone();
    run_accepting(worker, listener, acceptor, shutdown, accepting).await;
}

/// [`run`], also ending when `accepting` is cancelled (a child of `shutdown`) once the
/// connections open then have been closed by their peers: the stop of a worker whose
/// supervisor is gone, which leaves the dispatcher's links to it for the dispatcher to close.
pub async fn run_accepting(
    worker: Arc<Worker>,
    listener: TcpListener,
    acceptor: Acceptor,
    shutdown: CancellationToken,
    accepting: CancellationToken,
) {
    let cfg = worker.cfg.clone();
    let jobs = worker.ops.job_groups().clone();
    let handler = Handler {
        worker,
        drain: cfg.drain_period(),
        // One dispatcher connection carries every client's requests: its bound is the
        // worker's whole capacity (the dispatcher keeps itself below it).
        max_in_flight: cfg.limits.worker_max_concurrent,
    };
    let mut limits = ListenerLimits::from_config(&cfg.limits, cfg.limits.worker_max_concurrent);
    limits.io.max_frame += crate::frame::LINK_HEADROOM;
    server::serve(
        listener,
        acceptor,
        limits,
        handler,
        (shutdown, accepting),
        cfg.drain_period(),
    )
    .await;
    // Requests still running after the drain go on without their connections, and the
    // process may exit without dropping them: the jobs they started must not outlive the
    // worker, so their process groups are killed here, as is any job started from now on.
    let killed = jobs.kill_all();
    if killed > 0 {
        warn!(
            jobs = killed,
            "jobs still running after the drain were killed"
        );
    }
}
