//! Why a call failed, and which failures are worth another try.
//!
//! The variants that concern the connection tell the caller whether the request can have run:
//! [`ClientError::Connect`], [`ClientError::RefusedByDispatcher`],
//! [`ClientError::DispatcherNotAccepted`] and [`ClientError::NotSent`] mean it did not;
//! only [`ClientError::ConnectionLost`] leaves it open.

use crate::message::ErrorCode;
use crate::tls::HandshakeError;
use rustls::AlertDescription;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error. Displayed with the message made printable and cut
    /// to 1,024 characters: it may quote a worker's text, which is no terminal's to obey (an
    /// escape sequence, a line break that starts a fake line). `message` is as received.
    #[error("{code}: {}", crate::identity::printable_within(.message, 1024))]
    Remote {
        /// The error code.
        code: ErrorCode,
        /// The service's explanation.
        message: String,
    },
    /// No connection could be made: nothing listening, a reset, or no handshake within the
    /// deadline. Trouble that may pass: a call retries it until its deadline. Nothing was sent.
    #[error("cannot connect to {addr}: {reason}; the request was not sent")]
    Connect {
        /// The dispatcher address.
        addr: SocketAddr,
        /// Why (the last failure, when several tries failed).
        reason: String,
    },
    /// The dispatcher ended the TLS handshake with an alert. Most often it refused our
    /// certificate: `UnknownCA` (issued by another CA), `UnsupportedCertificate` or
    /// `BadCertificate` (not a client's certificate), `CertificateExpired`. Final: never retried,
    /// and no request ran.
    #[error("the dispatcher at {addr} {} (TLS alert: {alert:?})", refused_what(.alert))]
    RefusedByDispatcher {
        /// The dispatcher address.
        addr: SocketAddr,
        /// The alert it sent.
        alert: AlertDescription,
    },
    /// We refused the dispatcher: its certificate is not from our CA, has expired or is not the
    /// identity we expect, or it does not speak our protocol. Final: never retried; nothing was
    /// sent.
    #[error("the dispatcher at {addr} was not accepted: {reason}")]
    DispatcherNotAccepted {
        /// The dispatcher address.
        addr: SocketAddr,
        /// What was wrong with it.
        reason: String,
    },
    /// The connection broke after the request was written, and it could not be sent again (a
    /// non-idempotent op, or no time left).
    #[error("connection lost while the request was in progress; it may or may not have run")]
    ConnectionLost,
    /// The connection broke before the request was written, and the deadline left no time to
    /// send it on a new one. It did not run.
    #[error("connection lost before the request was sent; it did not run")]
    NotSent,
    /// The call's deadline passed. Said as the servers say theirs (`timeout: no answer
    /// within 495 ms`), so that a client's own deadline reads like the dispatcher's.
    #[error("timeout: no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The request, encoded, is larger than the largest frame: refused here, never sent. Said
    /// as the servers and the client's own payload check say `too_large`.
    #[error(
        "too_large: the request ({size} bytes encoded) is larger than the largest frame \
         ({max} bytes); the request was not sent"
    )]
    TooLarge {
        /// The size of the encoded request.
        size: u64,
        /// The largest frame.
        max: usize,
    },
    /// The request could not be encoded.
    #[error("{0}")]
    Request(String),
}

/// What an alert says the dispatcher refused.
fn refused_what(alert: &AlertDescription) -> &'static str {
    match alert {
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateRevoked
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateRequired
        | AlertDescription::UnknownCA
        | AlertDescription::AccessDenied => "refused our certificate",
        _ => "refused the TLS handshake",
    }
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
    /// Connection or TLS failure, including a certificate refused by either side.
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
            ClientError::Connect { .. }
            | ClientError::RefusedByDispatcher { .. }
            | ClientError::DispatcherNotAccepted { .. }
            | ClientError::ConnectionLost
            | ClientError::NotSent => FailureKind::Connection,
            ClientError::Timeout(_) => FailureKind::Unavailable,
            ClientError::TooLarge { .. } | ClientError::Request(_) => FailureKind::Refused,
        }
    }

    /// Whether the TLS handshake was refused, by either side: the same certificates would be
    /// refused again, so a call does not retry.
    pub fn is_tls_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::RefusedByDispatcher { .. } | ClientError::DispatcherNotAccepted { .. }
        )
    }

    /// The error for a failed dial of `addr`.
    pub(crate) fn from_handshake(addr: SocketAddr, e: HandshakeError) -> Self {
        match e {
            HandshakeError::Tls(rustls::Error::AlertReceived(alert)) => {
                ClientError::RefusedByDispatcher { addr, alert }
            }
            e if e.is_refusal() => ClientError::DispatcherNotAccepted {
                addr,
                reason: e.to_string(),
            },
            e => ClientError::Connect {
                addr,
                reason: e.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityError;

    #[test]
    fn a_calls_own_deadline_is_said_as_the_servers_say_theirs() {
        let e = ClientError::Timeout(Duration::from_millis(500));
        assert_eq!(e.to_string(), "timeout: no answer within 500 ms");
    }

    #[test]
    fn handshake_failures_are_sorted_into_final_and_passing() {
        let addr: SocketAddr = "127.0.0.1:2222".parse().unwrap();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases: Vec<(HandshakeError, bool, &str)> = vec![
            (
                HandshakeError::Io(refused),
                false,
                "cannot connect to 127.0.0.1:2222",
            ),
            (
                HandshakeError::Timeout(Duration::from_secs(1)),
                false,
                "the request was not sent",
            ),
            (
                HandshakeError::Tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
                true,
                "refused our certificate (TLS alert: UnknownCA)",
            ),
            (
                HandshakeError::Tls(rustls::Error::AlertReceived(
                    AlertDescription::NoApplicationProtocol,
                )),
                true,
                "refused the TLS handshake (TLS alert: NoApplicationProtocol)",
            ),
            (
                HandshakeError::Tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                true,
                "was not accepted: TLS: invalid peer certificate: UnknownIssuer",
            ),
            (
                HandshakeError::Identity(IdentityError::BadCertificate("x".into())),
                true,
                "was not accepted: identity refused",
            ),
            (HandshakeError::NoAlpn, true, "was not accepted"),
        ];
        for (e, is_final, needle) in cases {
            let what = e.to_string();
            let c = ClientError::from_handshake(addr, e);
            assert_eq!(c.is_tls_refusal(), is_final, "{what}: {c}");
            assert_eq!(c.kind(), FailureKind::Connection, "{what}");
            assert!(c.to_string().contains(needle), "{what}: {c}");
            assert!(!c.to_string().contains("may or may not"), "{c}");
        }
    }

    /// A worker's text in an error reaches the client's terminal: no escape sequence, line
    /// break or direction override of it may be shown as it is.
    #[test]
    fn a_remote_message_is_displayed_printable() {
        let e = ClientError::Remote {
            code: ErrorCode::OpFailed,
            message: "\u{1b}[31mred\n2026-01-01T00:00:00Z INFO forged\u{202e}".into(),
        };
        let shown = e.to_string();
        assert!(shown.starts_with("op_failed: "), "{shown}");
        assert!(shown.contains("red"), "{shown}");
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{shown:?}"
        );
    }
}
