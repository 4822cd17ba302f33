//! Operator-declared jobs: a program with fixed arguments, run directly (no shell), with an
//! empty environment, the payload on stdin, a timeout and a cap on its output.
//!
//! The job runs in its own process group so that a timeout kills everything it started, not
//! only the direct child. Its stderr is discarded: it is not the client's to see, and an
//! operator who wants it can wrap the program.

use super::ops::OpError;
use crate::config::JobConfig;
use crate::message::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Runs `job` with `payload` on stdin; the answer is its stdout.
pub async fn run(job: Arc<JobConfig>, payload: Bytes) -> Result<Bytes, OpError> {
    let mut cmd = Command::new(&job.program);
    cmd.args(&job.args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        tracing::warn!(job = %job.name, program = %job.program.display(), error = %e, "cannot start job");
        OpError::Failed(format!("job {} could not be started", job.name))
    })?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let kill_group = || {
        if let Some(pg) = pgid {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let cap = job.max_output_bytes;
    let work = async {
        let feed = async {
            if let Some(mut s) = stdin.take() {
                // A job that does not read its input is not an error.
                let _ = s.write_all(&payload).await;
            }
        };
        let collect = async {
            let mut out = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(cap as u64 + 1).read_to_end(&mut out).await;
            }
            out
        };
        let ((), out) = tokio::join!(feed, collect);
        out
    };
    let limit = Duration::from_millis(job.timeout_ms);
    let out = match tokio::time::timeout(limit, work).await {
        Ok(out) => out,
        Err(_) => {
            kill_group();
            let _ = child.wait().await;
            return Err(OpError::Timeout(format!(
                "job {} ran longer than {} ms and was killed",
                job.name, job.timeout_ms
            )));
        }
    };
    if out.len() > cap {
        kill_group();
        let _ = child.wait().await;
        return Err(OpError::TooLarge(format!(
            "job {} wrote more than {cap} bytes",
            job.name
        )));
    }
    // Output is complete (stdout closed); the process should be exiting. Bound the wait anyway.
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(OpError::Failed(format!("job {}: {e}", job.name))),
        Err(_) => {
            kill_group();
            let _ = child.wait().await;
            return Err(OpError::Timeout(format!(
                "job {} did not exit within {} ms and was killed",
                job.name, job.timeout_ms
            )));
        }
    };
    if status.success() {
        return Ok(out.into());
    }
    Err(OpError::Failed(match (status.code(), status.signal()) {
        (Some(code), _) => format!("job {} exited with status {code}", job.name),
        (None, Some(sig)) => format!("job {} was killed by signal {sig}", job.name),
        _ => format!("job {} failed", job.name),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn job(program: &str, args: &[&str], timeout_ms: u64, cap: usize) -> Arc<JobConfig> {
        Arc::new(JobConfig {
            name: "t".into(),
            program: PathBuf::from(program),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            max_output_bytes: cap,
            idempotent: false,
        })
    }

    #[tokio::test]
    async fn payload_in_stdout_out() {
        let out = run(
            job("/bin/cat", &[], 5_000, 1024),
            Bytes::from_static(b"hello"),
        )
        .await;
        assert_eq!(out.unwrap(), b"hello".as_slice());
    }

    #[tokio::test]
    async fn no_shell_and_no_environment() {
        // Arguments are passed as they are: no expansion, no globbing.
        let out = run(job("/bin/echo", &["$HOME", "*"], 5_000, 1024), Bytes::new()).await;
        assert_eq!(out.unwrap(), b"$HOME *\n".as_slice());
        let env = run(job("/usr/bin/env", &[], 5_000, 1024), Bytes::new()).await;
        assert_eq!(env.unwrap(), b"".as_slice());
    }

    #[tokio::test]
    async fn non_zero_exit_carries_the_status() {
        let err = run(job("/bin/sh", &["-c", "exit 3"], 5_000, 1024), Bytes::new()).await;
        assert_eq!(
            err,
            Err(OpError::Failed("job t exited with status 3".into()))
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let started = std::time::Instant::now();
        let err = run(
            job("/bin/sh", &["-c", "sleep 30 & sleep 30"], 300, 1024),
            Bytes::new(),
        )
        .await;
        assert!(matches!(err, Err(OpError::Timeout(_))), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn output_cap() {
        let err = run(
            job("/bin/sh", &["-c", "yes | head -c 100000"], 5_000, 1000),
            Bytes::new(),
        )
        .await;
        assert!(matches!(err, Err(OpError::TooLarge(_))), "{err:?}");
    }

    #[tokio::test]
    async fn missing_program_is_a_clean_error() {
        let err = run(job("/nonexistent/prog", &[], 5_000, 1000), Bytes::new()).await;
        assert!(matches!(err, Err(OpError::Failed(_))));
    }
}
