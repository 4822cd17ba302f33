//! The log line format: `2026-11-29T05:27:13.975786Z  INFO span{fields}: target: message k=v`,
//! the same layout as tracing-subscriber's default, but cheaper per line (the dispatcher writes
//! one audit line per request): the date and time to the second are formatted once per second
//! per thread, fields are written straight to the line ([`LeanFields`]), and no colour code
//! paths are taken.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter.
pub struct LeanFormat;

thread_local! {
    /// (second, "YYYY-MM-DDTHH:MM:SS") of the last line written by this thread.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// The start of every line: `2026-11-29T05:27:13.975786Z  INFO `.
pub fn write_prefix(w: &mut impl fmt::Write, at: SystemTime, level: &str) -> fmt::Result {
    write_timestamp(w, at)?;
    write!(w, " {level:>5} ")
}

fn write_timestamp(w: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    let now = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            cached.1.clear();
            if let Ok(t) = time::OffsetDateTime::from_unix_timestamp(secs as i64) {
                let _ = write!(
                    cached.1,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                );
            }
            cached.0 = secs;
        }
        write!(w, "{}.{:06}Z", cached.1, now.subsec_micros())
    })
}

impl<S, N> FormatEvent<S, N> for LeanFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A record bridged from the `log` crate (rustls logs that way) names its real target
        // and module in `log.*` fields; show that target, as the default format does.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write_prefix(&mut w, SystemTime::now(), meta.level().as_str())?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                w.write_str(span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(w, "{{{fields}}}")?;
                    }
                }
                w.write_str(": ")?;
            }
        }
        w.write_str(meta.target())?;
        w.write_str(": ")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// The field formatter: `message k=v k2=v2`, byte for byte what tracing-subscriber's
/// `DefaultFields` writes without colours (strings quoted, `%` values displayed, `?` values
/// debug-printed, terminal control characters escaped in messages and errors, an error's
/// sources listed, `log.*` metadata of bridged `log` records left out), minus its styling
/// machinery on every field; besides, every value and message has its line breaks and other
/// control characters escaped (see [`Escaped`]), so that one event is always one line.
pub struct LeanFields;

impl<'w> FormatFields<'w> for LeanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = LeanVisitor {
            sanitize: writer.sanitizes_ansi_escapes(),
            w: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct LeanVisitor<'a, 'w> {
    w: &'a mut Writer<'w>,
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl Visit for LeanVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.sanitize;
        let value_text = Escaped(format_args!("{value}"), sanitize);
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!(
                    "{value_text} {}.sources={}",
                    field.name(),
                    SourceList(source, sanitize)
                ),
            ),
            None => self.record_debug(field, &format_args!("{value_text}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        if !self.first {
            self.result = self.w.write_char(' ');
        }
        self.first = false;
        self.result = self.result.and_then(|()| match name {
            "message" => write!(self.w, "{:?}", Escaped(value, self.sanitize)),
            // A displayed (`%`) value is written as it is: one holding a line break could
            // forge a line of its own, whatever the caller meant to sanitize.
            _ => write!(
                self.w,
                "{}={:?}",
                name.strip_prefix("r#").unwrap_or(name),
                Escaped(value, true)
            ),
        });
    }
}

/// `value`, with control characters escaped when `.1` is set: those tracing-subscriber
/// escapes (ESC, BEL, BS, FF, DEL as `\xNN`, C1 controls as `\u{NN}`), and besides them line
/// breaks (`\n`, `\r`), the other C0 controls but tab, and the Unicode line separators and
/// bidirectional controls, so that a logged value cannot start a line or reorder one.
struct Escaped<T>(T, bool);

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            match ch {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_char(ch)?,
                '\x00'..='\x1f' | '\x7f' => write!(self.0, "\\x{:02x}", ch as u32)?,
                '\u{80}'..='\u{9f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(EscapingWriter(f), "{:?}", self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(EscapingWriter(f), "{}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// An error and its sources as a list: `[outer, inner, ...]`.
struct SourceList<'a>(&'a (dyn std::error::Error + 'static), bool);

impl fmt::Display for SourceList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&Escaped(format_args!("{e}"), self.1));
            next = e.source();
        }
        list.finish()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// A writer that keeps what it is given.
    #[derive(Clone, Default)]
    pub(in crate::cli) struct Capture(pub(in crate::cli) Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \u{9b}")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Logs the same events through `sub` and returns the lines without their timestamps.
    fn lines(sub: impl Subscriber + Send + Sync + 'static, out: &Capture) -> Vec<String> {
        // The bridge from the `log` crate, as `try_init` installs it (once per process).
        let _ = tracing_log::LogTracer::init();
        tracing::subscriber::with_default(sub, || {
            let err = std::io::Error::other("disk \"full\"");
            let span = tracing::info_span!("conn", peer = %"127.0.0.1:9", id = "spiffe://x/y");
            let _g = span.enter();
            tracing::info!(target: "securesrv::audit", client = %"spiffe://a/b", op = %"echo", outcome = %"ok", duration_us = 12u64, "request");
            tracing::warn!(error = %err, attempts = 3u32, ok = true, r#type = "t", dbg = ?vec![1, 2], "cannot reach worker");
            tracing::info!(quoted = "a \"b\"\n", neg = -5i64, "message with \"quotes\"");
            tracing::error!(only = 1u8);
            // Control characters a peer could smuggle into a message or an error.
            tracing::warn!(ctl = "\x1b[2J", "evil \x1b[31m\x07\x08\x0c\x7f\u{9b} text");
            let inner = std::io::Error::other("inner \x1b cause");
            let outer = Wrapped(inner);
            tracing::warn!(
                error = &outer as &(dyn std::error::Error + 'static),
                "with sources"
            );
            let plain = std::io::Error::other("no \u{85} source");
            tracing::warn!(error = &plain as &(dyn std::error::Error + 'static));
            // A record of the `log` crate (as rustls writes them), through the bridge.
            tracing_log::log::warn!(target: "rustls::conn", "from log");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                l.split_once(' ')
                    .map_or(l, |(_, rest)| rest)
                    .trim_start()
                    .to_string()
            })
            .collect()
    }

    /// The command's log format (without its filter and writer), writing to `out`.
    pub(in crate::cli) fn lean_subscriber(out: &Capture) -> impl Subscriber + Send + Sync {
        tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .event_format(LeanFormat)
            .fmt_fields(LeanFields)
            .finish()
    }

    #[test]
    fn a_value_cannot_start_a_line_of_its_own() {
        let out = Capture::default();
        tracing::subscriber::with_default(lean_subscriber(&out), || {
            let forged = "x\n2026-11-30T05:40:09Z  INFO securesrv::watchdog: FORGED\r\x1b[31m\u{202e}\u{2028}";
            tracing::info!(reason = %forged, also = ?forged, "closing\nconnection {}", forged);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("reason=x\\n2026"), "{text}");
        assert!(
            !text
                .trim_end_matches('\n')
                .chars()
                .any(|c| c.is_control() || matches!(c, '\u{202e}' | '\u{2028}')),
            "{text:?}"
        );
    }

    #[test]
    fn lean_lines_equal_the_default_formatter_without_colour() {
        let lean_out = Capture::default();
        let lean = lean_subscriber(&lean_out);
        let default_out = Capture::default();
        let default = tracing_subscriber::fmt()
            .with_writer(default_out.clone())
            .with_ansi(false)
            .event_format(LeanFormat)
            .finish();
        // And tracing-subscriber's own format end to end (its timestamps differ only in
        // being formatted every time).
        let full_out = Capture::default();
        let full = tracing_subscriber::fmt()
            .with_writer(full_out.clone())
            .with_ansi(false)
            .finish();
        let (a, b) = (lines(lean, &lean_out), lines(default, &default_out));
        assert_eq!(a.len(), 8, "{a:?}");
        assert_eq!(a, b);
        assert_eq!(a, lines(full, &full_out));
        assert!(
            a[4].contains("evil \\x1b[31m\\x07") && !a[4].contains('\x1b'),
            "{}",
            a[4]
        );
        assert!(
            a[5].contains("error=outer \\u{9b} error.sources=[inner \\x1b cause]"),
            "{}",
            a[5]
        );
        assert!(
            a[7].ends_with(
                "WARN conn{peer=127.0.0.1:9 id=\"spiffe://x/y\"}: rustls::conn: from log"
            ),
            "{}",
            a[7]
        );
        assert!(
            a[0].starts_with(
                "INFO conn{peer=127.0.0.1:9 id=\"spiffe://x/y\"}: securesrv::audit: request client=spiffe://a/b"
            ),
            "{}",
            a[0]
        );
    }
}
