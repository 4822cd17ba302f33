//! The dispatcher's audit line: one per request, with the client, op, worker, outcome and
//! duration, under the log target `securesrv::audit` at INFO.
//!
//! By default each line is a `tracing` event. A program may [`install`] an [`AuditSink`] that
//! receives the [`Record`] instead and writes the line later, off the request path: the
//! `securesrv` command does, and its log writer formats audit records on its flusher thread, in
//! the order they were recorded among the other log lines. Either way the log filter decides:
//! nothing is recorded while `securesrv::audit` is disabled at INFO.

use crate::message::ErrorCode;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

/// The log target of audit lines.
pub const TARGET: &str = "securesrv::audit";

/// One request's audit record.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request finished.
    pub at: SystemTime,
    /// The client connection's address.
    pub peer: SocketAddr,
    /// Whether the request ran inside the server's `conn` span (it does unless the log filter
    /// disables that span); the line then starts with `conn{peer=.. id=..}: ` as the event's
    /// would. Without it, the line has a `peer=` field of its own, so that no filter loses the
    /// client's address.
    pub in_conn_span: bool,
    /// The client identity.
    pub client: Arc<str>,
    /// The op, made printable.
    pub op: String,
    /// The worker that answered (or was tried last), if any.
    pub worker: Option<Arc<str>>,
    /// `ok`, or the error code and message the client received.
    pub outcome: Result<(), (ErrorCode, String)>,
    /// Time from the request's arrival to its answer.
    pub duration_us: u64,
}

/// Characters of an error message an audit line keeps.
const MAX_REASON: usize = 1024;

/// An error message as an audit line's `reason=`: it may quote what a peer sent (a worker's
/// error, a token's claims), so it is quoted and escaped, so that it can neither break the
/// line nor pose as further fields of it, and cut to 1,024 characters.
pub fn reason(message: &str) -> crate::identity::Quoted<'_> {
    crate::identity::quoted(message, MAX_REASON)
}

impl Record {
    /// The line after the level, exactly as the `tracing` event reads through the command's
    /// log format: `conn{peer=.. id=..}: securesrv::audit: request client=.. op=.. ...`.
    pub fn write_body(&self, w: &mut impl fmt::Write) -> fmt::Result {
        if self.in_conn_span {
            write!(w, "conn{{peer={} id={}}}: ", self.peer, self.client)?;
        }
        write!(w, "{TARGET}: request client={}", self.client)?;
        if !self.in_conn_span {
            write!(w, " peer={}", self.peer)?;
        }
        write!(
            w,
            " op={} worker={} outcome=",
            self.op,
            self.worker.as_deref().unwrap_or("-"),
        )?;
        match &self.outcome {
            Ok(()) => w.write_str("ok")?,
            Err((code, why)) => write!(w, "{code} reason={}", reason(why))?,
        }
        write!(w, " duration_us={}", self.duration_us)
    }

    /// Emits the record as a `tracing` event (what happens without a sink).
    pub fn emit_event(&self) {
        let worker = self.worker.as_deref().unwrap_or("-");
        let (client, op, peer, us) = (&self.client, &self.op, self.peer, self.duration_us);
        match (&self.outcome, self.in_conn_span) {
            (Ok(()), true) => {
                tracing::info!(target: TARGET, client = %client, op = %op, worker = %worker, outcome = %"ok", duration_us = us, "request");
            }
            (Ok(()), false) => {
                tracing::info!(target: TARGET, client = %client, peer = %peer, op = %op, worker = %worker, outcome = %"ok", duration_us = us, "request");
            }
            (Err((code, reason)), true) => {
                let reason = self::reason(reason);
                tracing::info!(target: TARGET, client = %client, op = %op, worker = %worker, outcome = %code, reason = %reason, duration_us = us, "request");
            }
            (Err((code, reason)), false) => {
                let reason = self::reason(reason);
                tracing::info!(target: TARGET, client = %client, peer = %peer, op = %op, worker = %worker, outcome = %code, reason = %reason, duration_us = us, "request");
            }
        }
    }
}

/// Takes audit records in place of `tracing` events.
pub trait AuditSink: Send + Sync + 'static {
    /// Takes one record. Must not block for long: it runs on the request path.
    fn record(&self, record: Record);
}

static SINK: OnceLock<Box<dyn AuditSink>> = OnceLock::new();

/// Sends every later audit record to `sink`. Only the first call in a process takes effect;
/// it returns false for any other.
pub fn install(sink: Box<dyn AuditSink>) -> bool {
    SINK.set(sink).is_ok()
}

/// Records one request, if `securesrv::audit` is enabled at INFO. `make` runs only then.
pub fn record(make: impl FnOnce() -> Record) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let r = make();
    match SINK.get() {
        Some(sink) => sink.record(r),
        None => r.emit_event(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_message_cannot_break_the_audit_line() {
        let r = Record {
            at: SystemTime::now(),
            peer: "127.0.0.1:9".parse().unwrap(),
            in_conn_span: true,
            client: "spiffe://securesrv/client/default".into(),
            op: "echo".into(),
            worker: None,
            outcome: Err((
                ErrorCode::BadRequest,
                format!("x\nINFO forged line\x1b[31m\u{202e}{}", "y".repeat(5000)),
            )),
            duration_us: 1,
        };
        let mut line = String::new();
        r.write_body(&mut line).unwrap();
        assert!(line.contains("reason=\"x"), "{line}");
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{line:?}"
        );
        assert!(line.len() < MAX_REASON + 300, "{} bytes", line.len());
    }

    /// The fields of an audit line after `request `, as a log parser reads them: `key=value`
    /// separated by spaces, a value in double quotes when it starts with one (`\"` and `\\`
    /// escaped within).
    fn fields(line: &str) -> Vec<(String, String)> {
        let mut rest = line.split_once("request ").expect("an audit line").1;
        let mut out = Vec::new();
        while let Some((key, after)) = rest.split_once('=') {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = if after.starts_with('"') {
                chars.next();
                let mut end = after.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                end
            } else {
                let end = after.find(' ').unwrap_or(after.len());
                value.push_str(&after[..end]);
                end
            };
            out.push((key.to_string(), value));
            rest = after[end..].trim_start_matches(' ');
        }
        out
    }

    #[test]
    fn an_error_message_cannot_pose_as_fields_of_the_audit_line() {
        // A compromised worker's error message, made to read as the end of this line and a
        // successful request of another client.
        let forged = r#"exit 0 duration_us=1 client=spiffe://securesrv/client/admin op=transfer outcome=ok \" x="#;
        let r = Record {
            at: SystemTime::now(),
            peer: "127.0.0.1:9".parse().unwrap(),
            in_conn_span: false,
            client: "spiffe://securesrv/client/alice".into(),
            op: "echo".into(),
            worker: Some("spiffe://securesrv/worker/2".into()),
            outcome: Err((ErrorCode::OpFailed, forged.into())),
            duration_us: 7,
        };
        let mut line = String::new();
        r.write_body(&mut line).unwrap();
        let keys: Vec<String> = fields(&line).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "client",
                "peer",
                "op",
                "worker",
                "outcome",
                "reason",
                "duration_us"
            ],
            "{line}"
        );
        let parsed = fields(&line);
        assert_eq!(parsed[0].1, "spiffe://securesrv/client/alice", "{line}");
        assert_eq!(parsed[5].1, forged, "{line}");
        assert_eq!(parsed[6].1, "7", "{line}");
    }
}
