//! Where log lines go: a shared in-memory buffer, written to stderr by a flusher thread every
//! 50 ms, or at once by the logging thread when 1 MiB has piled up. One audit line per
//! request must not cost a system call and a thread wake-up per request; with this writer a
//! busy component writes its logs in a few large writes per second. On a clean exit the guard
//! writes what is left; an abrupt kill may lose the last 50 ms of lines.
//!
//! The writer is also the dispatcher's [`AuditSink`]: an audit record is kept as it is, at its
//! place among the formatted lines, and turned into its line by the flusher thread, so the
//! request path pays for a queue push instead of formatting.

use securesrv::audit::{AuditSink, Record};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_AT: usize = 1024 * 1024;
/// Audit records kept before the recording thread formats and writes them itself.
const FLUSH_AT_RECORDS: usize = 16 * 1024;

/// What is waiting to be written: formatted lines, and audit records each with the length of
/// `bytes` when it was recorded (its place among the lines).
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    records: Vec<(usize, Record)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.records.is_empty()
    }

    /// Everything as text, audit records formatted at their places.
    fn render(self) -> Vec<u8> {
        if self.records.is_empty() {
            return self.bytes;
        }
        let mut out = String::with_capacity(self.bytes.len() + self.records.len() * 200);
        let mut done = 0;
        for (at, record) in &self.records {
            out.push_str(&String::from_utf8_lossy(&self.bytes[done..*at]));
            done = *at;
            let _ = super::logformat::write_prefix(&mut out, record.at, "INFO");
            let _ = record.write_body(&mut out);
            out.push('\n');
        }
        out.push_str(&String::from_utf8_lossy(&self.bytes[done..]));
        out.into_bytes()
    }
}

struct Shared {
    buf: Mutex<Pending>,
    /// Held while a chunk is written, so chunks reach stderr in the order they were taken.
    writing: Mutex<()>,
    stop: AtomicBool,
}

impl Shared {
    fn flush(&self) {
        let _order = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let pending = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()));
        if !pending.is_empty() {
            let chunk = pending.render();
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&chunk);
            let _ = err.flush();
        }
    }
}

/// The `MakeWriter` handed to tracing-subscriber.
#[derive(Clone)]
pub struct BufferedStderr(Arc<Shared>);

impl BufferedStderr {
    /// Writes out what is buffered now (before an exit that skips the guard's drop).
    pub fn flush_now(&self) {
        self.0.flush();
    }
}

/// Stops the flusher and writes what is left when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

/// A buffered stderr writer and the guard that owns its flusher thread.
pub fn buffered_stderr() -> (BufferedStderr, Guard) {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Pending {
            bytes: Vec::with_capacity(FLUSH_AT),
            records: Vec::new(),
        }),
        writing: Mutex::new(()),
        stop: AtomicBool::new(false),
    });
    let s = shared.clone();
    let flusher = std::thread::Builder::new()
        .name("log-flusher".into())
        .spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                std::thread::park_timeout(FLUSH_EVERY);
                s.flush();
            }
        })
        .ok();
    (BufferedStderr(shared.clone()), Guard { shared, flusher })
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.flusher.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.shared.flush();
    }
}

/// One event's writer.
pub struct Handle<'a>(&'a Shared);

impl Write for Handle<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut buf = self.0.buf.lock().unwrap_or_else(|p| p.into_inner());
            buf.bytes.extend_from_slice(data);
            buf.bytes.len() >= FLUSH_AT
        };
        if full {
            self.0.flush();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = Handle<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Handle(&self.0)
    }
}

impl AuditSink for BufferedStderr {
    fn record(&self, record: Record) {
        let full = {
            let mut buf = self.0.buf.lock().unwrap_or_else(|p| p.into_inner());
            let at = buf.bytes.len();
            buf.records.push((at, record));
            buf.records.len() >= FLUSH_AT_RECORDS
        };
        if full {
            self.0.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::logformat::tests::{Capture, lean_subscriber};
    use securesrv::message::ErrorCode;
    use std::time::SystemTime;

    fn records() -> Vec<Record> {
        let base = Record {
            at: SystemTime::now(),
            peer: "127.0.0.1:40000".parse().unwrap(),
            in_conn_span: true,
            client: "spiffe://securesrv/client/default".into(),
            op: "echo".into(),
            worker: Some("spiffe://securesrv/worker/1".into()),
            outcome: Ok(()),
            duration_us: 271,
        };
        vec![
            base.clone(),
            Record {
                op: "upper".into(),
                worker: None,
                outcome: Err((
                    ErrorCode::Unavailable,
                    "no worker available within 500 ms".into(),
                )),
                duration_us: 500_123,
                ..base.clone()
            },
            Record {
                peer: "[::1]:2222".parse().unwrap(),
                outcome: Err((ErrorCode::Denied, "a \"quoted\" reason".into())),
                ..base.clone()
            },
            // The log filter disabled the connection span: no prefix.
            Record {
                in_conn_span: false,
                ..base
            },
        ]
    }

    /// Drops the timestamp (the first word) of every line.
    fn untimed(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_string())
            .collect()
    }

    #[test]
    fn rendered_audit_records_read_like_their_tracing_events() {
        // The tracing path, inside the connection span the server opens.
        let out = Capture::default();
        let sub = lean_subscriber(&out);
        tracing::subscriber::with_default(sub, || {
            for r in records() {
                if !r.in_conn_span {
                    r.emit_event();
                    continue;
                }
                let span = tracing::info_span!("conn", peer = %r.peer, id = tracing::field::Empty);
                span.record("id", tracing::field::display(&r.client));
                let _g = span.enter();
                r.emit_event();
            }
        });
        let traced = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        // The sink path: records kept at their places among other lines.
        let mut pending = Pending::default();
        for (i, r) in records().into_iter().enumerate() {
            pending
                .bytes
                .extend_from_slice(format!("line {i}\n").as_bytes());
            pending.records.push((pending.bytes.len(), r));
        }
        pending.bytes.extend_from_slice(b"last\n");
        let rendered = String::from_utf8(pending.render()).unwrap();
        let lines = untimed(&rendered);
        let expected: Vec<String> = untimed(&traced);
        assert_eq!(expected.len(), 4, "{traced}");
        assert_eq!(lines.len(), 9, "{rendered}");
        for i in 0..4 {
            assert_eq!(lines[2 * i], format!("{i}"), "{rendered}");
            assert_eq!(lines[2 * i + 1], expected[i]);
        }
        assert!(expected[1].contains("outcome=unavailable reason=\"no worker available"));
        assert_eq!(lines[8], "last");
        assert!(
            expected[3]
                .trim_start()
                .starts_with("INFO securesrv::audit: request"),
            "{}",
            expected[3]
        );
        // Without the span's prefix, the client's address is a field of the line itself.
        assert!(
            expected[3].contains(
                "request client=spiffe://securesrv/client/default peer=127.0.0.1:40000 op=echo"
            ),
            "{}",
            expected[3]
        );
        assert!(!expected[0].contains(" peer="), "{}", expected[0]);
    }
}
