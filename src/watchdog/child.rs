//! Starting and stopping component processes.
//!
//! Each child gets a pipe on stdin whose write end only the watchdog holds: if the watchdog
//! dies, even by SIGKILL, the kernel closes it and the child (started with `--supervised`)
//! shuts down by itself. Stopping is SIGTERM (plus SIGCONT, so a stopped process can act on
//! it), then SIGKILL after a grace period.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, ChildStdin, Command};

/// A running component process.
pub struct Running {
    /// The process.
    pub child: Child,
    /// Held open for the child's lifetime; dropping it tells the child to exit.
    pub lifeline: Option<ChildStdin>,
    /// Its process id.
    pub pid: u32,
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
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let lifeline = child.stdin.take();
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("child exited at once"))?;
    Ok(Running {
        child,
        lifeline,
        pid,
    })
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(p), sig);
    }
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
