//! The writing end of the log writer: one chunk of lines at a time to stderr (or, in tests, to
//! any file), where a failed write loses lines but never silently and never in the middle of
//! the next line.
//!
//! - `WouldBlock` (stderr shares a pipe someone made non-blocking) is waited out, by sleeping
//!   and trying again; the lines behind it are the producers' business (see the parent's
//!   `wait_for_space`), not a reason to drop the chunk.
//! - Any other error drops the rest of the chunk, and its lines are counted.
//! - Lines the producers dropped because the buffer stayed full are counted too.
//! - Once a write goes through again, a WARN line says how many lines were lost and why,
//!   where the gap is. A line cut off by a failed write is ended with a line break first, so
//!   that it does not run into the next.
//! - To a pipe or a socket, which the watchdog and its components share, a chunk goes out in
//!   writes of whole lines of at most [`PIPE_BUF`] bytes: only those are written at once, and
//!   a larger write let another process's lines land inside one of ours (found by a chaos
//!   test: audit lines cut in two under load). A regular file takes each write whole.

use std::io::{ErrorKind, Write};
use std::time::{Duration, SystemTime};

/// First and longest sleep while stderr answers `WouldBlock`.
const WOULD_BLOCK_FIRST: Duration = Duration::from_millis(1);
const WOULD_BLOCK_MAX: Duration = Duration::from_millis(20);

/// The target named by the line that reports lost lines.
const TARGET: &str = "securesrv::cli::logwriter";

/// The most a write to a pipe takes at once, without another writer's bytes inside (POSIX
/// allows 512; Linux's is 4096).
pub(super) const PIPE_BUF: usize = 4096;

/// Where chunks go, and what has not been said yet about lines that did not get there.
pub(super) struct Out {
    target: Box<dyn Write + Send>,
    /// The most one write may carry: [`PIPE_BUF`] for a pipe or a socket, else no bound.
    piece: usize,
    /// Lines dropped by producers that found the buffer full for too long, not reported yet.
    lost_blocked: u64,
    /// Lines of chunks that could not be written, not reported yet.
    lost_failed: u64,
    /// The last write error, for the report.
    last_error: Option<String>,
    /// The last successful write ended inside a line.
    torn: bool,
}

impl Out {
    /// `piece`: see [`piece_for`].
    pub(super) fn new(target: Box<dyn Write + Send>, piece: usize) -> Self {
        Out {
            target,
            piece,
            lost_blocked: 0,
            lost_failed: 0,
            last_error: None,
            torn: false,
        }
    }

    /// Whether lost lines are waiting to be reported (worth a write even with no lines).
    pub(super) fn has_report(&self) -> bool {
        self.lost_blocked + self.lost_failed > 0
    }

    /// Writes `chunk`, after the report of lines lost before it if any; then counts
    /// `dropped_after`, lines producers dropped after the last line of `chunk`.
    pub(super) fn write_chunk(&mut self, chunk: &[u8], dropped_after: u64) {
        if self.torn || self.has_report() {
            let mut head = Vec::with_capacity(256);
            if self.torn {
                head.push(b'\n');
            }
            let reported = self.has_report();
            if reported {
                head.extend_from_slice(self.report().as_bytes());
            }
            // Only the line break and the report: nothing of the chunk is lost if they fail.
            if self.write_all(&head).is_ok() && reported {
                self.lost_blocked = 0;
                self.lost_failed = 0;
                self.last_error = None;
            }
        }
        let mut at = 0;
        while at < chunk.len() {
            let end = piece_end(chunk, at, self.piece);
            if let Err((e, written)) = self.write_all(&chunk[at..end]) {
                self.lost_failed += count_lines(&chunk[at + written..]);
                self.last_error = Some(e.to_string());
                break;
            }
            at = end;
        }
        self.lost_blocked += dropped_after;
    }

    /// The WARN line that says what was lost since the last report.
    fn report(&self) -> String {
        let mut line = String::with_capacity(256);
        let _ = super::super::logformat::write_prefix(&mut line, SystemTime::now(), "WARN");
        line.push_str(TARGET);
        line.push_str(": log lines lost");
        line.push_str(&format!(
            " lost={} while_blocked={} write_failed={}",
            self.lost_blocked + self.lost_failed,
            self.lost_blocked,
            self.lost_failed
        ));
        if let Some(e) = &self.last_error {
            // An io::Error's text has no quote or line break in it; escaped all the same.
            line.push_str(&format!(" error={e:?}"));
        }
        line.push('\n');
        line
    }

    /// Writes all of `bytes`, waiting out `WouldBlock`; on another error, that error and how
    /// many bytes went out before it.
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), (std::io::Error, usize)> {
        let mut done = 0;
        let mut nap = WOULD_BLOCK_FIRST;
        while done < bytes.len() {
            match self.target.write(&bytes[done..]) {
                Ok(0) => return Err((ErrorKind::WriteZero.into(), done)),
                Ok(n) => {
                    done += n;
                    self.torn = bytes[done - 1] != b'\n';
                    nap = WOULD_BLOCK_FIRST;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(WOULD_BLOCK_MAX);
                }
                Err(e) => return Err((e, done)),
            }
        }
        let _ = self.target.flush();
        Ok(())
    }
}

/// How much one write to `fd` may carry so that it is never split: [`PIPE_BUF`] for a pipe
/// or a socket, no bound for anything else (a regular file, a terminal).
pub(super) fn piece_for(fd: std::os::fd::BorrowedFd<'_>) -> usize {
    use nix::sys::stat::{SFlag, fstat};
    match fstat(fd) {
        Ok(st) => {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFIFO || kind == SFlag::S_IFSOCK {
                PIPE_BUF
            } else {
                usize::MAX
            }
        }
        Err(_) => PIPE_BUF,
    }
}

/// Where the write of `chunk` from `at` ends: after the last whole line within `piece`
/// bytes, or after the first line if that one alone is longer.
pub(super) fn piece_end(chunk: &[u8], at: usize, piece: usize) -> usize {
    let rest = &chunk[at..];
    if rest.len() <= piece {
        return chunk.len();
    }
    match rest[..piece].iter().rposition(|b| *b == b'\n') {
        Some(i) => at + i + 1,
        None => rest
            .iter()
            .position(|b| *b == b'\n')
            .map_or(chunk.len(), |i| at + i + 1),
    }
}

/// Lines in `bytes`, a last one without its line break included.
pub(super) fn count_lines(bytes: &[u8]) -> u64 {
    let breaks = bytes.iter().filter(|b| **b == b'\n').count();
    let unended = !bytes.is_empty() && !bytes.ends_with(b"\n");
    (breaks + usize::from(unended)) as u64
}
