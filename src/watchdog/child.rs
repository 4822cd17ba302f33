//! Starting and stopping component processes.
//!
//! Each child gets a pipe on stdin whose write end only the watchdog holds: if the watchdog
//! dies, even by SIGKILL, the kernel closes it and the child (started with `--supervised`)
//! shuts down by itself. Stopping is SIGTERM (plus SIGCONT, so a stopped process can act on
//! it), then SIGKILL after a grace period. A second signal to the watchdog passes a second
//! signal on to every component still running ([`stop_all_now`]).
//!
//! A child's stdout is a pipe too: once it has bound its port it writes [`BOUND_LINE`] there,
//! and only then is it heartbeaten. Otherwise a heartbeat could reach whatever else answers
//! on that port with the same certificates (a previous generation still running) and count a
//! child that never started as up. Its other stdout lines are passed on.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

/// What a component exits with when it refuses its configuration, a certificate or a key:
/// starting it again cannot help until someone fixes them.
pub const EXIT_CONFIG: i32 = 64;

/// What a supervised component writes on stdout once it has bound its port.
pub const BOUND_LINE: &str = "securesrv-component-bound";

/// Called by a supervised component as it starts.
///
/// - A session of its own, whose ID is its PID, marks everything it and its jobs start, so
///   that the watchdog can tell the orphans of a dead component from other processes (see
///   [`super::orphans`]). It also keeps the terminal's Ctrl-C to the watchdog, which stops the
///   components in their order.
/// - SIGCONT when the watchdog dies (`PR_SET_PDEATHSIG`): a component stopped by SIGSTOP would
///   otherwise never read the end of its lifeline and would hold its port for good. SIGCONT
///   does nothing to a running process, so it is harmless if it comes early (the signal
///   follows the thread that started the child, not the process).
pub fn prepare_supervised() -> nix::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGCONT)?;
    nix::unistd::setsid().map(|_| ())
}

/// Tells the supervising watchdog that this component has bound its port.
pub fn announce_bound() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{BOUND_LINE}");
    let _ = out.flush();
}

/// The PIDs of the components started and not yet reaped, for [`stop_all_now`]. A PID leaves
/// with its [`Running`], which is dropped as soon as a wait has reaped the process, so the
/// PID of a component that is gone (and may since name another process) is never signalled.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// For the watchdog's exit on a second signal: gives every component still running a second
/// signal too, on which it exits at once (a worker kills its jobs first), instead of draining
/// for up to its grace period after the watchdog has gone. SIGTERM and SIGINT both, as two
/// different signals cannot merge into one pending signal: a component that has not yet had
/// the watchdog's SIGTERM sees two, one that is draining sees at least one more. SIGCONT lets
/// a stopped one act on them.
pub fn stop_all_now() {
    for &pid in live().iter() {
        signal(pid, Signal::SIGTERM);
        signal(pid, Signal::SIGINT);
        signal(pid, Signal::SIGCONT);
    }
}

/// A running component process.
pub struct Running {
    /// The process.
    pub child: Child,
    /// Held open for the child's lifetime; dropping it tells the child to exit.
    pub lifeline: Option<ChildStdin>,
    /// Its process id.
    pub pid: u32,
    /// Set once the child has said it bound its port.
    bound: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        live().retain(|&pid| pid != self.pid);
    }
}

impl Running {
    /// Whether the child has bound its port (so a heartbeat on it reaches this child).
    pub fn is_bound(&self) -> bool {
        self.bound.load(Ordering::Acquire)
    }
}

/// Starts `exe args... --supervised`, with `threads` runtime threads unless the operator set
/// `SECURESRV_THREADS` already.
pub fn spawn(exe: &Path, args: &[OsString], threads: usize) -> std::io::Result<Running> {
    let mut cmd = Command::new(exe);
    if std::env::var_os("SECURESRV_THREADS").is_none() {
        cmd.env("SECURESRV_THREADS", threads.to_string());
    }
    cmd.args(args)
        .arg("--supervised")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let lifeline = child.stdin.take();
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("child exited at once"))?;
    live().push(pid);
    let bound = Arc::new(AtomicBool::new(false));
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(read_stdout(stdout, bound.clone()));
    }
    Ok(Running {
        child,
        lifeline,
        pid,
        bound,
    })
}

/// Reads a child's stdout until it closes: [`BOUND_LINE`] sets `bound`; other lines (none are
/// expected) are passed on to ours, a long one in pieces of [`MAX_LINE`] bytes. Bytes, not
/// text, so that nothing a child writes ends the reading (and with it the child's stdout), and
/// written asynchronously, so that a stdout nobody reads cannot block a runtime thread.
async fn read_stdout(stdout: tokio::process::ChildStdout, bound: Arc<AtomicBool>) {
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut out = tokio::io::stdout();
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.strip_suffix(b"\n") == Some(BOUND_LINE.as_bytes()) {
            bound.store(true, Ordering::Release);
        } else {
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let _ = out.write_all(&line).await;
            let _ = out.flush().await;
        }
    }
}

/// Longest piece of a child's stdout passed on at once.
const MAX_LINE: usize = 4096;

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// Waits up to `first` for a child that is already stopping by itself to exit, unsignalled
/// (a SIGTERM would be its second signal, on which it exits at once), then [`stop`]s it.
pub async fn stop_after(
    mut r: Running,
    first: Duration,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    if let Ok(status) = tokio::time::timeout(first, r.child.wait()).await {
        return status;
    }
    stop(r, grace).await
}

/// SIGTERM (+SIGCONT), wait up to `grace`, then SIGKILL. Returns how it ended.
pub async fn stop(mut r: Running, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(status) = r.child.try_wait()? {
        return Ok(status);
    }
    signal(r.pid, Signal::SIGTERM);
    signal(r.pid, Signal::SIGCONT);
    match tokio::time::timeout(grace, r.child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal(r.pid, Signal::SIGKILL);
            r.child.wait().await
        }
    }
}

/// Whether a component ended as one does when someone sent it SIGTERM, SIGINT or SIGHUP: status 0
/// after its drain, 130 if a second signal cut the drain short (the watchdog never sends
/// one), or killed by that signal if it came before the component had set up its handling of
/// it (early in its start).
pub fn asked_to_stop(status: &ExitStatus) -> bool {
    status.success()
        || status.code() == Some(crate::shutdown::EXIT_INTERRUPTED)
        || status.signal().is_some_and(|s| {
            [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP]
                .iter()
                .any(|&asked| s == asked as i32)
        })
}

/// "exit status 3" / "killed by signal 9 (SIGKILL)".
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by signal {s} ({sig})"),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "ended".into(),
    }
}

#[cfg(test)]
mod stop_kinds {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_stop_someone_asked_for_is_told_from_a_crash() {
        // Wait statuses: a signal number alone, or the exit code shifted by 8.
        assert!(asked_to_stop(&ExitStatus::from_raw(0)));
        assert!(asked_to_stop(&ExitStatus::from_raw(Signal::SIGTERM as i32)));
        assert!(asked_to_stop(&ExitStatus::from_raw(Signal::SIGINT as i32)));
        assert!(asked_to_stop(&ExitStatus::from_raw(Signal::SIGHUP as i32)));
        assert!(!asked_to_stop(&ExitStatus::from_raw(
            Signal::SIGKILL as i32
        )));
        assert!(!asked_to_stop(&ExitStatus::from_raw(
            Signal::SIGSEGV as i32
        )));
        assert!(!asked_to_stop(&ExitStatus::from_raw(1 << 8)));
        assert!(!asked_to_stop(&ExitStatus::from_raw(64 << 8)));
        // Two signals from an operator (or systemd's default KillMode): exit 130 at once. It
        // counted as a crash, and six such stops marked a worker FAILED for a minute.
        assert!(asked_to_stop(&ExitStatus::from_raw(130 << 8)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait_bound(r: &Running) -> bool {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while !r.is_bound() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    #[tokio::test]
    async fn a_child_counts_as_bound_only_once_it_says_so() {
        // `sh -c SCRIPT --supervised`: the script prints a line, waits for a line on stdin (the
        // test's cue), then announces the port.
        let script = format!("echo hello; read cue; echo {BOUND_LINE}; sleep 5");
        let mut r = spawn(Path::new("/bin/sh"), &["-c".into(), script.into()], 1).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!r.is_bound(), "bound before it said so");
        let mut cue = r.lifeline.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut cue, b"go\n")
            .await
            .unwrap();
        assert!(wait_bound(&r).await, "the announcement was missed");
        stop(r, Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn bytes_that_are_not_text_and_long_lines_do_not_hide_the_announcement() {
        let script = format!(
            "printf '\\377\\376\\n'; head -c 10000 /dev/zero | tr '\\0' a; echo; echo {BOUND_LINE}; sleep 5"
        );
        let r = spawn(Path::new("/bin/sh"), &["-c".into(), script.into()], 1).unwrap();
        assert!(wait_bound(&r).await, "the announcement was missed");
        stop(r, Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn a_child_that_exits_without_binding_never_counts_as_bound() {
        let mut r = spawn(Path::new("/bin/sh"), &["-c".into(), "exit 3".into()], 1).unwrap();
        let status = r.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(!r.is_bound());
    }
}
