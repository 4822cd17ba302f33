//! Lines on stdout and stderr that cannot panic.
//!
//! `println!` and `eprintln!` panic when the write fails — a full disk (`> /dev/full`), a
//! reader that went away (`| head -1`), a terminal that hung up — and the panic ends the
//! process: a running watchdog took its whole service down with it. Here a failed write on
//! stdout is returned to the caller, who decides what it means (the client's answer not
//! written is a failure; the watchdog's `ready` line is only warned about), and a failed
//! write on stderr is dropped: there is nowhere else to say it.
//!
//! [`errln!`](crate::errln) is the `eprintln!` to use; `lib.rs` and `main.rs` deny the
//! printing macros outside tests so that none comes back.

use std::fmt;
use std::io::Write;

/// Writes `args` and a line break to stdout, then flushes it (a line must be out before, say,
/// a supervisor reads it, and a failure must show here, not at exit).
pub fn out_line(args: fmt::Arguments<'_>) -> std::io::Result<()> {
    out_bytes(format!("{args}\n").as_bytes())
}

/// Writes `bytes` to stdout, then flushes it.
pub fn out_bytes(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Writes `args` and a line break to stderr in one write (lines of processes sharing the
/// stream do not interleave), ignoring a failure.
pub fn err_line(args: fmt::Arguments<'_>) {
    err_text(&format!("{args}\n"));
}

/// Writes `text` to stderr as it is, ignoring a failure (a progress line ending in `\r`).
pub fn err_text(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `eprintln!` that cannot panic: the line goes to stderr in one write, or nowhere if stderr
/// cannot be written.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::stdio::err_line(::std::format_args!($($arg)*))
    };
}
