//! A plain mTLS echo server speaking the securesrv protocol (`request` -> `reply` with the same
//! payload), used as the backend behind a reference relay such as nginx's `stream` proxy when
//! comparing it with the dispatcher. It checks the peer's certificate against the CA and its
//! role like a dispatcher does, but tolerates a missing ALPN (nginx's upstream TLS sends none).
//! Not part of the service.

use crate::connection::Connection;
use crate::identity::{PeerPolicy, Role};
use crate::message::{ErrorCode, ErrorReply, Message, Reply};
use crate::server::IdentitySlots;
use crate::session::{self, Next, Placement, RequestLimits};
use crate::tls::{TlsConfigError, TlsMaterial, Transport};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Serves echo on `listener` until `shutdown`.
pub async fn run(
    material: &TlsMaterial,
    listener: TcpListener,
    limits: &crate::config::Limits,
    shutdown: CancellationToken,
) -> Result<(), TlsConfigError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(material.server_config(Role::Dispatcher)?);
    let policy = PeerPolicy::Serve {
        trust_domain: material.own_id().trust_domain().to_string(),
        endpoint: Role::Dispatcher,
    };
    let io = limits.io();
    let per_conn = limits.max_in_flight_per_connection;
    info!(addr = ?listener.local_addr().ok(), "echo backend listening");
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, policy, shutdown) = (acceptor.clone(), policy.clone(), shutdown.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(5), acceptor.accept(Transport::new(tcp)))
                    .await
            else {
                debug!(%addr, "handshake failed");
                return;
            };
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first().cloned());
            if leaf.is_none_or(|l| policy.check_certificate(&l).is_err()) {
                return;
            }
            let limits = RequestLimits {
                per_connection: per_conn,
                identity: IdentitySlots::new(per_conn, usize::MAX),
                drain: Duration::from_secs(1),
                leftovers: Default::default(),
            };
            session::drive(
                Connection::new(stream, io),
                shutdown,
                limits,
                |msg, s| match msg {
                    Message::Request(r) => {
                        let (id, len) = (r.id, r.payload.len());
                        s.start(id, Placement::Inline, len, async move {
                            Message::Reply(Reply {
                                id,
                                payload: r.payload,
                            })
                        })
                    }
                    other => Next::Reply(Message::Error(ErrorReply {
                        id: 0,
                        code: ErrorCode::BadRequest,
                        message: format!("echo backend takes requests only, not {}", other.kind()),
                    })),
                },
            )
            .await;
        });
    }
}
