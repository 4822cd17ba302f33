//! Where log lines go: a shared in-memory buffer, written to stderr by a flusher thread every
//! 50 ms, or at once by the logging thread when 1 MiB has piled up. One audit line per
//! request must not cost a system call and a thread wake-up per request; with this writer a
//! busy component writes its logs in a few large writes per second. On a clean exit the guard
//! writes what is left; an abrupt kill may lose the last 50 ms of lines.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_AT: usize = 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    /// Held while a chunk is written, so chunks reach stderr in the order they were taken.
    writing: Mutex<()>,
    stop: AtomicBool,
}

impl Shared {
    fn flush(&self) {
        let _order = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let chunk = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()));
        if !chunk.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&chunk);
            let _ = err.flush();
        }
    }
}

/// The `MakeWriter` handed to tracing-subscriber.
#[derive(Clone)]
pub struct BufferedStderr(Arc<Shared>);

/// Stops the flusher and writes what is left when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

/// A buffered stderr writer and the guard that owns its flusher thread.
pub fn buffered_stderr() -> (BufferedStderr, Guard) {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
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
            buf.extend_from_slice(data);
            buf.len() >= FLUSH_AT
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
