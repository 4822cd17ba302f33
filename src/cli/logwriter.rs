//! Where log lines go: a shared in-memory buffer, written to stderr by a flusher thread every
//! 50 ms, or as soon as 1 MiB (or 16,384 audit records) has piled up. One audit line per
//! request must not cost a system call and a thread wake-up per request; with this writer a
//! busy component writes its logs in a few large writes per second.
//!
//! Only the flusher thread writes, so a stderr that does not take lines (a reader that
//! stopped reading, a full disk) blocks that thread and nothing else:
//!
//! - A thread logging into a full buffer waits for the flusher to take it for at most
//!   [`Policy::wait_for_space`] from the moment the buffer filled (a component: 500 ms, to
//!   ride out a slow reader; the watchdog: not at all). After that, lines are dropped and
//!   counted until the flusher takes the buffer; the request path never stalls longer than
//!   that for its log.
//! - Lost lines are reported by a WARN line where the gap is, once a write goes through
//!   again (see [`out`]).
//! - On the way out, [`Guard`]'s drop gives the flusher [`EXIT_FLUSH_WITHIN`] to write what
//!   is left, and the process exits whether it did or not. An abrupt kill loses the lines of
//!   the last 50 ms.
//!
//! The writer is also the dispatcher's [`AuditSink`]: an audit record is kept as it is, at its
//! place among the formatted lines, and turned into its line by the flusher thread, so the
//! request path pays for a queue push instead of formatting.

mod out;
#[cfg(test)]
mod tests;

use out::Out;
use securesrv::audit::{AuditSink, Record};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing_subscriber::fmt::MakeWriter;

const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// How long the process exit waits for the flusher to write what is left. A stderr that takes
/// nothing (a stuck pipe) must not keep a process from exiting with its exit code.
pub const EXIT_FLUSH_WITHIN: Duration = Duration::from_secs(1);

/// How long a component's logging thread waits for room in a full buffer before it drops
/// lines. Well under a heartbeat (1 s by default; three missed get a component killed, which
/// loses far more than a few lines), long enough for a reader that paused (a log shipper's
/// rotation, a short burst beyond its pace).
pub const COMPONENT_WAIT_FOR_SPACE: Duration = Duration::from_millis(500);

/// What the writer does when stderr does not keep up.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// How long a thread logging into a full buffer may wait for it to be taken, counted from
    /// the moment the buffer filled; lines beyond are dropped and counted. Zero: never wait.
    pub wait_for_space: Duration,
    /// Formatted bytes that make the buffer full.
    pub max_bytes: usize,
    /// Audit records (kept unformatted) that make the buffer full.
    pub max_records: usize,
}

impl Policy {
    /// A component's: ride out a slow reader for [`COMPONENT_WAIT_FOR_SPACE`], then drop.
    pub fn component() -> Self {
        Policy {
            wait_for_space: COMPONENT_WAIT_FOR_SPACE,
            max_bytes: 1024 * 1024,
            max_records: 16 * 1024,
        }
    }

    /// The watchdog's: its lines are few, and its supervision and signal handling must never
    /// wait for its stderr; a line that finds the buffer full is dropped and counted at once.
    pub fn watchdog() -> Self {
        Policy {
            wait_for_space: Duration::ZERO,
            ..Self::component()
        }
    }
}

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

    fn is_full(&self, policy: &Policy) -> bool {
        self.bytes.len() >= policy.max_bytes || self.records.len() >= policy.max_records
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

/// The state producers and the flusher share, under one lock.
#[derive(Default)]
struct State {
    pending: Pending,
    /// Lines dropped since the flusher last took `pending` (all after its last line).
    dropped: u64,
    /// When `pending` was first found full since the flusher last took it.
    full_since: Option<Instant>,
    /// Flushes asked for by [`BufferedStderr::flush_within`], and the last one done.
    asked: u64,
    done: u64,
    stop: bool,
    /// The flusher thread has written its last and returned.
    finished: bool,
}

struct Shared {
    policy: Policy,
    state: Mutex<State>,
    /// Wakes the flusher: the buffer is full, a flush was asked for, or the process stops.
    work: Condvar,
    /// Wakes the waiting producers and askers: the flusher took the buffer or wrote it.
    taken: Condvar,
    /// Held by the one thread writing (the flusher; without one, each logging thread).
    out: Mutex<Out>,
    /// No flusher thread could be started: each line is written by its logging thread.
    inline: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one event's `lines` with `add`, waiting for room as the policy allows, or drops
    /// them and counts them.
    fn push(&self, lines: u64, add: impl FnOnce(&mut Pending)) {
        let mut st = self.lock();
        if st.pending.is_full(&self.policy) {
            self.work.notify_one();
            let deadline =
                *st.full_since.get_or_insert_with(Instant::now) + self.policy.wait_for_space;
            while st.pending.is_full(&self.policy) {
                let now = Instant::now();
                if now >= deadline {
                    st.dropped += lines;
                    return;
                }
                st = self
                    .taken
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        add(&mut st.pending);
        let full = st.pending.is_full(&self.policy);
        drop(st);
        if self.inline {
            self.write_pending();
        } else if full {
            self.work.notify_one();
        }
    }

    /// Takes what is pending and writes it, with the report of lost lines if one is due;
    /// whether it took any lines (written or dropped).
    fn write_pending(&self) -> bool {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let (pending, dropped, asked) = {
            let mut st = self.lock();
            st.full_since = None;
            let taken = (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.dropped),
                st.asked,
            );
            self.taken.notify_all();
            taken
        };
        let took = !pending.is_empty() || dropped > 0;
        if took || out.has_report() {
            out.write_chunk(&pending.render(), dropped);
        }
        drop(out);
        let mut st = self.lock();
        st.done = st.done.max(asked);
        self.taken.notify_all();
        took
    }

    /// The flusher thread: every 50 ms, or when woken, until told to stop; then what is left.
    fn run_flusher(&self) {
        loop {
            let stop = {
                let st = self.lock();
                let (st, _) = self
                    .work
                    .wait_timeout_while(st, FLUSH_EVERY, |st| {
                        !st.stop && st.asked == st.done && !st.pending.is_full(&self.policy)
                    })
                    .unwrap_or_else(|p| p.into_inner());
                st.stop
            };
            if stop {
                // Lines logged while the last ones are written are written too.
                while self.write_pending() {}
                break;
            }
            self.write_pending();
        }
        self.lock().finished = true;
        self.taken.notify_all();
    }
}

/// The `MakeWriter` handed to tracing-subscriber.
#[derive(Clone)]
pub struct BufferedStderr(Arc<Shared>);

impl BufferedStderr {
    /// Has what is buffered now written (before an exit that skips the guard's drop), waiting
    /// for it up to `within`; whether it was written in time.
    pub fn flush_within(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut st = self.0.lock();
        st.asked += 1;
        let ticket = st.asked;
        self.0.work.notify_one();
        while st.done < ticket && !st.finished {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .0
                .taken
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.done >= ticket
    }
}

/// Stops the flusher and has it write what is left when dropped, waiting for it up to
/// [`EXIT_FLUSH_WITHIN`].
pub struct Guard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

/// A buffered writer to this process's stderr, and the guard that owns its flusher thread.
pub fn buffered_stderr(policy: Policy) -> (BufferedStderr, Guard) {
    // A descriptor of its own, so that the flusher blocked on a stuck stderr does not hold
    // the lock of `std::io::stderr()` that every other writer of stderr takes.
    let target: Box<dyn Write + Send> = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(std::io::stderr()),
    };
    let piece = out::piece_for(std::io::stderr().as_fd());
    buffered(target, piece, policy)
}

/// A buffered writer to `target`, in writes of at most `piece` bytes where lines allow (see
/// [`out`]).
fn buffered(
    target: Box<dyn Write + Send>,
    piece: usize,
    policy: Policy,
) -> (BufferedStderr, Guard) {
    let mut shared = Shared {
        policy,
        state: Mutex::new(State {
            pending: Pending {
                bytes: Vec::with_capacity(policy.max_bytes.min(1024 * 1024)),
                records: Vec::new(),
            },
            ..State::default()
        }),
        work: Condvar::new(),
        taken: Condvar::new(),
        out: Mutex::new(Out::new(target, piece)),
        inline: false,
    };
    let (tx, rx) = std::sync::mpsc::channel::<Arc<Shared>>();
    let flusher = std::thread::Builder::new()
        .name("log-flusher".into())
        .stack_size(super::components::THREAD_STACK)
        .spawn(move || {
            if let Ok(s) = rx.recv() {
                s.run_flusher();
            }
        })
        .ok();
    shared.inline = flusher.is_none();
    let shared = Arc::new(shared);
    if flusher.is_some() {
        let _ = tx.send(shared.clone());
    }
    (BufferedStderr(shared.clone()), Guard { shared, flusher })
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(flusher) = self.flusher.take() else {
            self.shared.write_pending();
            return;
        };
        let deadline = Instant::now() + EXIT_FLUSH_WITHIN;
        let mut st = self.shared.lock();
        st.stop = true;
        self.shared.work.notify_one();
        while !st.finished {
            let now = Instant::now();
            if now >= deadline {
                // Blocked on a stderr that takes nothing: left behind, the exit goes on.
                return;
            }
            st = self
                .shared
                .taken
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        let _ = flusher.join();
    }
}

/// One event's writer.
pub struct Handle<'a>(&'a Shared);

impl Write for Handle<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // One event is one line (the format escapes line breaks), written in one call.
        let lines = out::count_lines(data).max(1);
        self.0.push(lines, |p| p.bytes.extend_from_slice(data));
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
        self.0.push(1, |p| {
            let at = p.bytes.len();
            p.records.push((at, record));
        });
    }
}
