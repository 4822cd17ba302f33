//! Unit tests of the log writer: audit records rendered like their events, and what a
//! stderr that does not take lines does to the writer and to its callers.

use super::*;
use crate::cli::logformat::tests::{Capture, lean_subscriber};
use securesrv::message::ErrorCode;
use std::io::Read;
use std::sync::mpsc;
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

/// A policy with a small buffer, so that a test fills it with a few hundred lines.
fn small(wait_for_space: Duration) -> Policy {
    Policy {
        wait_for_space,
        max_bytes: 4096,
        max_records: 64,
    }
}

/// Line `i` of a test, 100 bytes with its line break.
fn line(i: usize) -> String {
    format!("line {i:05} {}\n", "x".repeat(88))
}

/// Logs lines `range` through `w` on a thread of its own; the receiver hears when it is done.
fn log_lines(w: &BufferedStderr, range: std::ops::Range<usize>) -> mpsc::Receiver<()> {
    let w = w.clone();
    let (done, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for i in range {
            let _ = w.make_writer().write_all(line(i).as_bytes());
        }
        let _ = done.send(());
    });
    rx
}

/// Reads `r` to its end on a thread of its own.
fn read_all(mut r: std::io::PipeReader) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = r.read_to_end(&mut text);
        let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    rx
}

/// A pipe already full, as a stderr nobody reads is: its reader, and how many bytes of filler
/// come before anything written to it.
fn stuck_pipe() -> (std::io::PipeReader, std::io::PipeWriter, usize) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (r, mut wr) = std::io::pipe().unwrap();
    fcntl(&wr, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut filled = 0;
    for piece in [4096, 1] {
        while let Ok(n) = wr.write(&vec![b'.'; piece]) {
            filled += n;
        }
    }
    fcntl(&wr, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (r, wr, filled)
}

/// Drops the writer and its guard (the flusher writes what is left), on a thread of its own;
/// the receiver hears when the drop returned.
fn close(w: BufferedStderr, guard: Guard) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(guard);
        drop(w);
        let _ = tx.send(());
    });
    rx
}

const BOUND: Duration = Duration::from_secs(20);

/// The value of `key=` in a line.
fn count_field(line: &str, key: &str) -> u64 {
    let at = line.find(&format!(" {key}=")).expect(key) + key.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a count")
}

/// A stderr nobody reads (a reader stopped by SIGSTOP, `> fifo` with a reader that never
/// reads) stalled the process's exit for ever: the guard's drop joined a flusher blocked in
/// `write_all`, so the watchdog never exited and a second signal did nothing. Found by an
/// environment review.
#[test]
fn the_exit_waits_only_briefly_for_a_stderr_that_takes_nothing() {
    let (r, wr, _) = stuck_pipe();
    let (w, guard) = buffered(Box::new(wr), usize::MAX, small(Duration::ZERO));
    log_lines(&w, 0..1).recv_timeout(BOUND).unwrap();
    assert!(
        !w.flush_within(Duration::from_millis(100)),
        "the pipe is full"
    );
    close(w, guard)
        .recv_timeout(BOUND)
        .expect("the guard's drop returns although stderr takes nothing");
    drop(r);
}

/// A stuck stderr made every logging thread block once the buffer was full, for as long as
/// it stayed stuck: the dispatcher stopped answering, missed its heartbeats and was killed,
/// losing every buffered line. Now a thread waits for room briefly, then the lines are
/// dropped, counted, and reported once stderr takes lines again, where the gap is.
#[test]
fn a_full_buffer_is_waited_for_briefly_then_lines_are_dropped_counted_and_reported() {
    let (r, wr, filled) = stuck_pipe();
    let (w, guard) = buffered(Box::new(wr), usize::MAX, small(Duration::from_millis(100)));
    let total = 3000;
    log_lines(&w, 0..total)
        .recv_timeout(BOUND)
        .expect("logging goes on although stderr takes nothing");
    let text = read_all(r);
    close(w, guard).recv_timeout(BOUND).unwrap();
    let text = text.recv_timeout(BOUND).unwrap();
    let text = &text[filled..];
    let lines: Vec<&str> = text.lines().collect();
    let report = lines
        .iter()
        .position(|l| l.contains(" WARN securesrv::cli::logwriter: log lines lost "))
        .unwrap_or_else(|| panic!("no report in {} lines", lines.len()));
    let lost = count_field(lines[report], "lost");
    assert_eq!(count_field(lines[report], "while_blocked"), lost);
    assert_eq!(count_field(lines[report], "write_failed"), 0);
    // Lines before the gap in order and whole, the report, then the lines after it.
    let written = lines.len() - 1;
    assert!(lost > 0 && written > 0, "{lost} lost, {written} written");
    assert_eq!(written as u64 + lost, total as u64, "{text}");
    for (n, l) in lines[..report].iter().enumerate() {
        assert_eq!(format!("{l}\n"), line(n));
    }
    let first_after = total - (written - report);
    for (n, l) in lines[report + 1..].iter().enumerate() {
        assert_eq!(format!("{l}\n"), line(first_after + n));
    }
}

/// Writes to a pipe, except: with `cut` set, that many bytes more, then every write fails as
/// one to `/dev/full` does (ENOSPC) until `cut` is cleared.
struct FillsUp {
    pipe: std::io::PipeWriter,
    full: std::fs::File,
    cut: Arc<Mutex<Option<usize>>>,
}

impl Write for FillsUp {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut cut = self.cut.lock().unwrap();
        match *cut {
            None => self.pipe.write(data),
            Some(0) => self.full.write(data),
            Some(room) => {
                let n = self.pipe.write(&data[..room.min(data.len())])?;
                *cut = Some(room - n);
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A failed write (a full disk) threw its chunk away without a word, and a line cut off in
/// the middle ran into the next line written. Found by an environment review.
#[test]
fn lines_lost_to_write_errors_are_reported_and_a_cut_line_is_ended() {
    let (r, wr) = std::io::pipe().unwrap();
    let cut = Arc::new(Mutex::new(Some(30)));
    let target = FillsUp {
        pipe: wr,
        full: std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
        cut: cut.clone(),
    };
    let (w, guard) = buffered(Box::new(target), usize::MAX, small(Duration::ZERO));
    // Line 0 is cut after 30 bytes; line 1 finds the disk full.
    for i in 0..2 {
        log_lines(&w, i..i + 1).recv_timeout(BOUND).unwrap();
        assert!(w.flush_within(BOUND));
    }
    *cut.lock().unwrap() = None;
    log_lines(&w, 2..3).recv_timeout(BOUND).unwrap();
    assert!(w.flush_within(BOUND));
    let text = read_all(r);
    close(w, guard).recv_timeout(BOUND).unwrap();
    let text = text.recv_timeout(BOUND).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], &line(0)[..30]);
    assert!(
        lines[1].contains(" WARN securesrv::cli::logwriter: log lines lost lost=2 while_blocked=0 write_failed=2 error=\"No space left on device"),
        "{text}"
    );
    assert_eq!(format!("{}\n", lines[2]), line(2));
}

/// A stderr made non-blocking by someone sharing it (`O_NONBLOCK` on a pipe) answered
/// `WouldBlock` whenever its reader paused, and each such chunk was thrown away. Now it is
/// waited out: nothing is lost.
#[test]
fn would_block_is_waited_out_and_nothing_is_lost() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (r, wr) = std::io::pipe().unwrap();
    fcntl(&wr, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    // Producers may wait as long as the test does: every line must get through.
    let (w, guard) = buffered(Box::new(wr), usize::MAX, small(BOUND));
    let total = 1500;
    let logged = log_lines(&w, 0..total);
    // The flusher meets a full pipe (150 KB of lines, 64 KiB of pipe) before anyone reads.
    std::thread::sleep(Duration::from_millis(200));
    let text = read_all(r);
    logged.recv_timeout(BOUND).unwrap();
    close(w, guard).recv_timeout(BOUND).unwrap();
    let text = text.recv_timeout(BOUND).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        total,
        "{}",
        &text[text.len().saturating_sub(500)..]
    );
    for (n, l) in lines.iter().enumerate() {
        assert_eq!(format!("{l}\n"), line(n));
    }
}

/// Every write a target was given, as it was given.
#[derive(Clone, Default)]
struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

impl Write for Writes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// To a pipe (shared by the watchdog and its components) a chunk went out in one write of
/// hundreds of KB, which the kernel splits: another process's lines landed inside our audit
/// lines under load (found by a chaos test). Writes are now whole lines of at most PIPE_BUF
/// bytes; a single longer line goes out alone.
#[test]
fn to_a_pipe_lines_go_out_whole_in_writes_a_pipe_takes_at_once() {
    let (_r, wr) = std::io::pipe().unwrap();
    assert_eq!(out::piece_for(wr.as_fd()), out::PIPE_BUF);
    let file = tempfile::tempfile().unwrap();
    assert_eq!(out::piece_for(file.as_fd()), usize::MAX);

    let writes = Writes::default();
    let mut chunk = Vec::new();
    for i in 0..200 {
        chunk.extend_from_slice(format!("line {i} {}\n", "x".repeat(i % 97)).as_bytes());
    }
    let long = format!("{}\n", "y".repeat(3 * out::PIPE_BUF));
    chunk.extend_from_slice(long.as_bytes());
    chunk.extend_from_slice(b"last\n");
    let mut o = out::Out::new(Box::new(writes.clone()), out::PIPE_BUF);
    o.write_chunk(&chunk, 0);
    let writes = writes.0.lock().unwrap();
    assert!(writes.len() > 2, "{} writes", writes.len());
    assert_eq!(writes.concat(), chunk);
    for w in writes.iter() {
        assert!(w.ends_with(b"\n"), "a write ends inside a line");
        assert!(
            w.len() <= out::PIPE_BUF || w[..w.len() - 1].iter().all(|b| *b != b'\n'),
            "a write of {} bytes holds more than one line",
            w.len()
        );
    }
    assert!(writes.iter().any(|w| w.as_slice() == long.as_bytes()));
}
