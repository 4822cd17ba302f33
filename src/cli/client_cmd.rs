//! `securesrv client`: one request with the answer on stdout, or an interactive loop.

use super::{EXIT_CONFIG, load_config};
use clap::Args;
use securesrv::certs::CertError;
use securesrv::client::{CallOptions, Client, ClientConfig, ClientError, FailureKind};
use securesrv::errln;
use securesrv::files::BoundedLine;
use securesrv::identity::SpiffeId;
use securesrv::tls::{TlsConfigError, TlsMaterial};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `securesrv client`.
#[derive(Args, Debug, Default)]
pub struct ClientArgs {
    /// Client certificate.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Client private key (must be mode 0600).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// CA certificate (default: ca.crt beside --cert).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Dispatcher address, IP:PORT or HOST:PORT (default: from the config, 127.0.0.1:2222).
    #[arg(long, value_name = "ADDR", value_parser = securesrv::client::check_addr)]
    connect: Option<String>,
    /// The dispatcher identity to accept (default: spiffe://<trust-domain>/dispatcher/main).
    #[arg(long, value_name = "SPIFFE_ID")]
    server_id: Option<String>,
    /// Deadline of each request in milliseconds, connecting included, 1 to 86400000 (a day)
    /// [default: 15000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=securesrv::config::MAX_MS))]
    timeout_ms: Option<u64>,
    /// Write answers as the bytes they are even to a terminal (by default a terminal shows
    /// their control characters as escapes, `\x1b`, and bytes that are not UTF-8 as U+FFFD):
    /// for `ssh -t host securesrv client ... > file`, where stdout is the remote terminal.
    #[arg(long)]
    raw: bool,
    /// Treat OP as idempotent (retried after a lost connection); built-ins always are.
    /// Needs OP: the interactive loop has no use for it.
    #[arg(long, requires = "op")]
    idempotent: bool,
    /// Read the payload from this file. Needs OP: the interactive loop reads its payloads
    /// from its lines.
    #[arg(long, value_name = "PATH", conflicts_with = "payload", requires = "op")]
    data_file: Option<PathBuf>,
    /// Operation: echo, sha256, sleep or a configured job. Without it: read `op payload` lines.
    op: Option<String>,
    /// Payload (`-` reads stdin).
    payload: Option<String>,
}

/// Exit code for a failed call.
fn exit_for(e: &ClientError) -> ExitCode {
    ExitCode::from(match e.kind() {
        FailureKind::Refused => 3,
        FailureKind::Unavailable => 4,
        FailureKind::Connection => 5,
        FailureKind::OpFailed => 6,
        FailureKind::Other => 1,
    })
}

/// Runs the client command.
pub fn run(args: ClientArgs, config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_deref(), |_| {}) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (cert, key, ca) = super::identity_files(
        &cfg,
        "client",
        args.cert.clone(),
        args.key.clone(),
        args.ca.clone(),
    );
    let server_id = match &args.server_id {
        Some(s) => s.parse::<SpiffeId>(),
        None => SpiffeId::dispatcher(&cfg.trust_domain),
    };
    let server_id = match server_id {
        Ok(id) => id,
        Err(e) => {
            errln!("securesrv: --server-id: {e}");
            return ExitCode::from(2);
        }
    };
    let addr: SocketAddr = match args.connect.as_deref().map(securesrv::client::resolve_addr) {
        None => cfg.dispatcher.listen,
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            // A name that does not resolve is a connection failure, as an unreachable address.
            errln!("securesrv: --connect: {e}");
            return ExitCode::from(5);
        }
    };
    let material = match TlsMaterial::load(&ca, &cert, &key) {
        Ok(m) => m,
        Err(e) => {
            // A CA path the operator did not give: say where it came from.
            let derived_ca = args.ca.is_none()
                && matches!(&e, TlsConfigError::Files(CertError::Missing { path, .. }) if *path == ca);
            let origin = if derived_ca {
                " (without --ca, the CA is ca.crt beside the certificate)"
            } else {
                ""
            };
            errln!("securesrv: {e}{origin}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut client_cfg = match ClientConfig::new(&material, addr, server_id) {
        Ok(c) => c,
        Err(e) => {
            errln!("securesrv: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The configuration's frame limit, both ways: requests and answers up to it.
    client_cfg.io.max_frame = cfg.limits.max_frame_bytes;
    if let Some(ms) = args.timeout_ms {
        client_cfg.call_timeout = Duration::from_millis(ms);
    }
    let rt = match super::command_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match args.op.clone() {
        Some(op) => {
            let max = cfg.limits.max_frame_bytes;
            let payload = match read_payload(&args, max as u64) {
                Ok(p) => p,
                // As the client refuses any request over the frame cap: exit 3, not sent.
                Err(PayloadError::TooLarge(from)) => {
                    errln!(
                        "securesrv: too_large: the payload from {from} is larger than the \
                         largest frame ({max} bytes); the request was not sent"
                    );
                    return ExitCode::from(3);
                }
                Err(PayloadError::Unreadable(e)) => {
                    errln!("securesrv: {e}");
                    return ExitCode::from(2);
                }
            };
            let escape = !args.raw && std::io::stdout().is_terminal();
            rt.block_on(one_request(
                client_cfg,
                &op,
                &payload,
                args.idempotent,
                escape,
            ))
        }
        None => rt.block_on(interactive(
            client_cfg,
            !args.raw && std::io::stdout().is_terminal(),
        )),
    }
}

/// Why there is no payload to send.
enum PayloadError {
    /// Larger than a frame can carry (from where, printable).
    TooLarge(String),
    /// The file or standard input could not be read.
    Unreadable(std::io::Error),
}

/// The payload: the data file or standard input, read up to `max` bytes (the largest frame,
/// which no payload can exceed: `/dev/zero` given by mistake is refused, not read for ever),
/// or the argument itself.
fn read_payload(args: &ClientArgs, max: u64) -> Result<Vec<u8>, PayloadError> {
    let read = |from: &mut dyn std::io::Read, name: String| {
        securesrv::files::read_bounded(from, max).map_err(|e| match e.kind() {
            std::io::ErrorKind::FileTooLarge => PayloadError::TooLarge(name.clone()),
            kind => PayloadError::Unreadable(std::io::Error::new(kind, format!("{name}: {e}"))),
        })
    };
    if let Some(path) = &args.data_file {
        let name =
            securesrv::identity::printable_within(&path.display().to_string(), 256).into_owned();
        // Any file that can be read: a FIFO such as a shell's `<(...)` too.
        let mut file = std::fs::File::open(path).map_err(|e| {
            PayloadError::Unreadable(std::io::Error::new(e.kind(), format!("{name}: {e}")))
        })?;
        return read(&mut file, name);
    }
    match args.payload.as_deref() {
        None => Ok(Vec::new()),
        Some("-") => read(&mut std::io::stdin(), "standard input".into()),
        Some(p) => Ok(p.as_bytes().to_vec()),
    }
}

/// One request; `escape`: its answer goes to a terminal, to be shown rather than obeyed.
async fn one_request(
    cfg: ClientConfig,
    op: &str,
    payload: &[u8],
    idempotent: bool,
    escape: bool,
) -> ExitCode {
    let timeout = cfg.call_timeout;
    // Connected by the call itself, so that `--timeout-ms` bounds connecting too and a
    // dispatcher that is restarting is waited for within it.
    let client = Client::new(cfg);
    let opts = CallOptions {
        idempotent: idempotent || securesrv::config::BUILTIN_OPS.contains(&op),
        timeout,
    };
    let result = client.call_with(op, payload, opts).await;
    client.close().await;
    match result {
        Ok(mut out) => {
            if escape {
                out = shown_on_a_terminal(&out);
            }
            if op == "sha256" {
                out.extend_from_slice(b"\n");
            }
            write_answer(&out).map_or_else(|code| code, |()| ExitCode::SUCCESS)
        }
        Err(e) => {
            errln!("securesrv: {e}");
            exit_for(&e)
        }
    }
}

/// An answer as a terminal shows it: read, not obeyed. An escape sequence from a job or an
/// echo must not set the terminal's title or clear it; control characters become escapes
/// (`\x1b`), line breaks and tabs stay. Written anywhere else, an answer is its bytes.
fn shown_on_a_terminal(answer: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(answer);
    securesrv::identity::controls_visible(&text)
        .into_owned()
        .into_bytes()
}

/// Writes an answer to stdout. One that cannot be written (a full disk, a reader gone) is a
/// failure, exit 1: a script must not take the empty output for the answer.
fn write_answer(answer: &[u8]) -> Result<(), ExitCode> {
    securesrv::stdio::out_bytes(answer).map_err(|e| {
        errln!("securesrv: cannot write the answer to stdout: {e}");
        ExitCode::FAILURE
    })
}

/// Connects, trying again while the call deadline allows (a dispatcher that is still starting
/// or restarting, as right after `1. Run Watchdog`); a refused certificate is final.
async fn connect_within_deadline(cfg: ClientConfig) -> Result<Client, ClientError> {
    let deadline = tokio::time::Instant::now() + cfg.call_timeout;
    let mut pause = Duration::from_millis(50);
    let mut said = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // Within what is left of this wait; each request of the session still gets the
        // whole `--timeout-ms`.
        match Client::connect_within(cfg.clone(), left).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_tls_refusal() => return Err(e),
            Err(e) if left <= pause => return Err(e),
            Err(e) => {
                // A wait for the deadline is never silent: the user learns why at once.
                if !std::mem::replace(&mut said, true) {
                    let reason = match &e {
                        ClientError::Connect { reason, .. } => reason.clone(),
                        other => other.to_string(),
                    };
                    tracing::info!(
                        "cannot connect to {}: {reason}; trying again {}",
                        cfg.addr,
                        securesrv::client::for_up_to(deadline)
                    );
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// The interactive loop's `help`, on stderr with the prompt (stdout holds answers only).
const HELP: &str = "\
Each line is one request: OP PAYLOAD, the op, a space, then the rest of the line as the
payload, sent as bytes.
Built-in ops:
  echo TEXT      answers TEXT
  sha256 TEXT    answers the SHA-256 digest of TEXT, in lowercase hex
  sleep MS       waits MS milliseconds (at most the service's limits.max_sleep_ms)
Any other op is a job the service's configuration declares, if its ACL lets you call it.
help or ?      this text
quit, exit, q  leave (so does the end of the input, Ctrl-D on a terminal)";

/// What the interactive loop's reader thread hands over.
enum Input {
    /// A line: its number (from 1) and its bytes, without the line break.
    Line(u64, Vec<u8>),
    /// A line longer than the largest frame, dropped: its number and its length.
    TooLong(u64, u64),
    /// Standard input could not be read (EIO, EISDIR): the last thing handed over.
    Failed(std::io::Error),
}

/// The original's "send another request?" loop: one `op payload` per line, read as bytes (a
/// line that is not UTF-8 is no end of input).
async fn interactive(cfg: ClientConfig, shown_on_terminal: bool) -> ExitCode {
    let tty = std::io::stdin().is_terminal();
    let addr = cfg.addr;
    let cfg_max_frame = cfg.io.max_frame;
    let client = match connect_within_deadline(cfg).await {
        Ok(c) => c,
        Err(e) => {
            errln!("securesrv: {e}");
            return exit_for(&e);
        }
    };
    // The banner and the prompt are for a terminal, on stderr: stdout holds the answers alone
    // (`securesrv client > answers.txt` shows the prompt and writes no prompt to the file).
    if tty {
        errln!("Connected to {addr}. Enter `op payload` (e.g. `echo hello`), `help`, or `quit`.");
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(1);
    // Lines are read on a plain thread: stdin is blocking. None is longer than a frame could
    // carry: a longer one (`< /dev/zero`) is dropped as it is read, not kept.
    let max = cfg_max_frame;
    // (A stack size of our own, not RUST_MIN_STACK's; if the thread cannot be started, `rx`
    // ends at once and so does the session.)
    let _ = std::thread::Builder::new()
        .stack_size(super::components::THREAD_STACK)
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut number = 0;
            loop {
                let mut line = Vec::new();
                let input = match securesrv::files::read_line_bounded(&mut stdin, max, &mut line) {
                    Ok(BoundedLine::End) => break,
                    Ok(BoundedLine::Line) => {
                        number += 1;
                        Input::Line(number, line)
                    }
                    Ok(BoundedLine::TooLong(len)) => {
                        number += 1;
                        Input::TooLong(number, len)
                    }
                    Err(e) => Input::Failed(e),
                };
                let failed = matches!(input, Input::Failed(_));
                if tx.blocking_send(input).is_err() || failed {
                    break;
                }
            }
        });
    let mut status = ExitCode::SUCCESS;
    loop {
        if tty {
            securesrv::stdio::err_text("securesrv> ");
        }
        let (number, line) = match rx.recv().await {
            None => {
                // Ctrl-D leaves the cursor after the prompt: end its line, as the menu does.
                if tty {
                    securesrv::stdio::err_text("\n");
                }
                break;
            }
            Some(Input::Line(number, line)) => (number, line),
            Some(Input::TooLong(number, len)) => {
                errln!(
                    "error: too_large: line {number} is {len} bytes, more than the largest frame \
                     ({cfg_max_frame} bytes); the request was not sent"
                );
                status = ExitCode::from(3);
                continue;
            }
            Some(Input::Failed(e)) => {
                // Not the end of the input: what follows was never read, and a script must
                // not take the requests sent so far for all of them.
                errln!("securesrv: cannot read standard input: {e}");
                status = ExitCode::FAILURE;
                break;
            }
        };
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let (op, payload) = match line.iter().position(u8::is_ascii_whitespace) {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &[][..]),
        };
        // The payload is sent as it is, bytes; an op is a name, and one that is not UTF-8
        // names nothing.
        let Ok(op) = std::str::from_utf8(op) else {
            errln!("error: line {number}: the op is not UTF-8; the line was not sent");
            status = ExitCode::from(3);
            continue;
        };
        if payload.is_empty() && matches!(op, "quit" | "exit" | "q") {
            break;
        }
        // Answered here: `help` is no op of the service (it was sent, refused as
        // `unknown_op`, and the session ended with 3).
        if payload.is_empty() && matches!(op, "help" | "?") {
            errln!("{HELP}");
            continue;
        }
        // `call` applies the client's deadline and treats the built-ins as idempotent.
        match client.call(op, payload).await {
            Ok(mut out) => {
                if shown_on_terminal {
                    out = shown_on_a_terminal(&out);
                }
                out.extend_from_slice(b"\n");
                // Answers nobody sees: send no more requests (they may have effects).
                if let Err(code) = write_answer(&out) {
                    status = code;
                    break;
                }
            }
            Err(e) => {
                errln!("error: {e}");
                status = exit_for(&e);
            }
        }
    }
    client.close().await;
    status
}
