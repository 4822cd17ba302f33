//! Operator-declared jobs: a program with fixed arguments, run directly (no shell), with an
//! empty environment, the payload on stdin, a timeout and a cap on its output.
//!
//! The job runs in its own process group, and however the job ends (see `group.rs`) the whole
//! group is killed, not only the direct child: nothing the program started outlives the job.
//! Its stderr is discarded: it is not the client's to see, and an operator who wants it can
//! wrap the program.

mod group;

pub use group::JobGroups;

use super::ops::OpError;
use crate::config::JobConfig;
use crate::message::Bytes;
use group::{JobProcess, StartError};
use std::os::unix::process::ExitStatusExt;
use std::pin::pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;

/// Runs `job` with `payload` on stdin, its process group registered in `groups`; the answer
/// is its stdout.
///
/// One deadline, set here, bounds the whole job: feeding stdin, collecting stdout and waiting
/// for the program to exit.
pub async fn run(job: Arc<JobConfig>, payload: Bytes, groups: JobGroups) -> Result<Bytes, OpError> {
    let deadline = Instant::now() + Duration::from_millis(job.timeout_ms);
    let mut cmd = Command::new(&job.program);
    cmd.args(&job.args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // From here on, however this future ends, the job's process group is killed.
    let mut process = match JobProcess::spawn(&mut cmd, &groups) {
        Ok(p) => p,
        Err(StartError::Spawn(e)) => {
            tracing::warn!(job = %job.name, program = %job.program.display(), error = %e, "cannot start job");
            return Err(OpError::Failed(format!(
                "job {} could not be started",
                job.name
            )));
        }
        Err(StartError::Stopping) => {
            return Err(OpError::Failed(format!(
                "job {} was not started: the worker is stopping",
                job.name
            )));
        }
    };
    let (stdin, stdout) = process.take_stdio();
    let cap = job.max_output_bytes;
    let work = async move {
        let feed = async move {
            if let Some(mut s) = stdin {
                // A job that does not read its input is not an error: once it has exited, the
                // rest of the payload meets a closed pipe (EPIPE) and is dropped.
                let _ = s.write_all(&payload).await;
            }
        };
        let collect = async move {
            let mut out = Vec::new();
            let read = match stdout {
                Some(s) => s.take(cap as u64 + 1).read_to_end(&mut out).await.map(drop),
                None => Ok(()),
            };
            (out, read)
        };
        let mut feed = pin!(feed);
        let mut collect = pin!(collect);
        tokio::select! {
            () = &mut feed => collect.await,
            (out, read) = &mut collect => {
                // Stdout closed: the program may still be reading its input, so keep feeding
                // it. Past the cap, or if stdout failed, the job is over: its stdin is dropped
                // with `feed` (a program that never reads would keep the write blocked).
                if read.is_ok() && out.len() <= cap {
                    feed.await;
                }
                (out, read)
            }
        }
    };
    let Ok((out, read)) = tokio::time::timeout_at(deadline, work).await else {
        let _ = process.finish().await;
        return Err(OpError::Timeout(format!(
            "job {} ran longer than {} ms and was killed",
            job.name, job.timeout_ms
        )));
    };
    if out.len() > cap {
        let _ = process.finish().await;
        return Err(OpError::TooLarge(format!(
            "job {} wrote more than {cap} bytes",
            job.name
        )));
    }
    if let Err(e) = read {
        tracing::warn!(job = %job.name, error = %e, "cannot read job output");
        let _ = process.finish().await;
        return Err(OpError::Failed(format!(
            "job {}: its output could not be read",
            job.name
        )));
    }
    // Output is complete (stdout closed); the program should be exiting, within what is left
    // of the job's time.
    let exited = tokio::time::timeout_at(deadline, process.exited()).await;
    // The job is over: whatever it left running in its group is killed, then it is reaped.
    let status = match (exited, process.finish().await) {
        (Err(_), _) => {
            return Err(OpError::Timeout(format!(
                "job {} did not exit within {} ms and was killed",
                job.name, job.timeout_ms
            )));
        }
        (Ok(Err(e)), _) | (_, Err(e)) => {
            return Err(OpError::Failed(format!("job {}: {e}", job.name)));
        }
        (Ok(Ok(())), Ok(status)) => status,
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
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    /// Upper bound on every wait in these tests.
    const WAIT: Duration = Duration::from_secs(10);

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

    /// `/bin/sh -c` running `sleep 30` in the background (its pid written to `pidfile`: the
    /// grandchild whose fate the test checks), then `rest`.
    fn with_grandchild(pidfile: &Path, rest: &str, timeout_ms: u64, cap: usize) -> Arc<JobConfig> {
        let script = format!(
            "sleep 30 >/dev/null 2>&1 & echo $! > '{}'; {rest}",
            pidfile.display()
        );
        job("/bin/sh", &["-c", &script], timeout_ms, cap)
    }

    async fn run_alone(job: Arc<JobConfig>, payload: Bytes) -> Result<Bytes, OpError> {
        run(job, payload, JobGroups::default()).await
    }

    /// The pid the job wrote to `pidfile`, once it is there (bounded).
    async fn read_pid(pidfile: &Path) -> Pid {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(pidfile).unwrap_or_default();
            if let Some(pid) = text.strip_suffix('\n') {
                return Pid::from_raw(pid.parse().expect("a pid"));
            }
            assert!(Instant::now() < deadline, "the job wrote no pid");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// No process `pid`, or only its zombie waiting for its new parent to reap it.
    fn gone(pid: Pid) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        // The state follows the command name in parentheses.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        matches!(state, Some("Z") | Some("X") | None)
    }

    /// Waits (bounded) until `pid` is gone; if it is not, kills it (by pid) and fails.
    async fn assert_gone(pid: Pid) {
        let deadline = Instant::now() + WAIT;
        while !gone(pid) {
            if Instant::now() >= deadline {
                let _ = kill(pid, Signal::SIGKILL);
                panic!("process {pid}, started by a job, outlived it");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn payload_in_stdout_out() {
        let out = run_alone(
            job("/bin/cat", &[], 5_000, 1024),
            Bytes::from_static(b"hello"),
        )
        .await;
        assert_eq!(out.unwrap(), b"hello".as_slice());
    }

    #[tokio::test]
    async fn no_shell_and_no_environment() {
        // Arguments are passed as they are: no expansion, no globbing.
        let out = run_alone(job("/bin/echo", &["$HOME", "*"], 5_000, 1024), Bytes::new()).await;
        assert_eq!(out.unwrap(), b"$HOME *\n".as_slice());
        let env = run_alone(job("/usr/bin/env", &[], 5_000, 1024), Bytes::new()).await;
        assert_eq!(env.unwrap(), b"".as_slice());
    }

    #[tokio::test]
    async fn non_zero_exit_carries_the_status() {
        let err = run_alone(job("/bin/sh", &["-c", "exit 3"], 5_000, 1024), Bytes::new()).await;
        assert_eq!(
            err,
            Err(OpError::Failed("job t exited with status 3".into()))
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let started = Instant::now();
        let err = run_alone(
            with_grandchild(&pidfile, "sleep 30", 1_000, 1024),
            Bytes::new(),
        )
        .await;
        assert!(matches!(err, Err(OpError::Timeout(_))), "{err:?}");
        assert!(started.elapsed() < WAIT);
        assert_gone(read_pid(&pidfile).await).await;
    }

    #[tokio::test]
    async fn output_cap_kills_the_whole_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let job = with_grandchild(&pidfile, "yes | head -c 100000", 5_000, 1000);
        let err = run_alone(job, Bytes::new()).await;
        assert!(matches!(err, Err(OpError::TooLarge(_))), "{err:?}");
        assert_gone(read_pid(&pidfile).await).await;
    }

    #[tokio::test]
    async fn output_cap_ends_a_job_that_does_not_read_its_input() {
        // `yes` never reads stdin: feeding it 1 MB blocks once the pipe is full, but the
        // output cap is reached at once and must end the job, not its timeout.
        let started = Instant::now();
        let err = run_alone(
            job("/usr/bin/yes", &[], 20_000, 64 * 1024),
            Bytes::from(vec![b'x'; 1_000_000]),
        )
        .await;
        assert!(matches!(err, Err(OpError::TooLarge(_))), "{err:?}");
        assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_job_may_exit_without_reading_all_its_input() {
        // `head` exits after one read: the rest of the payload meets a closed pipe (EPIPE),
        // which is not an error.
        let out = run_alone(
            job("/usr/bin/head", &["-c", "5"], 5_000, 1024),
            Bytes::from(vec![b'x'; 1_000_000]),
        )
        .await;
        assert_eq!(out.unwrap(), b"xxxxx".as_slice());
    }

    #[tokio::test]
    async fn one_deadline_covers_output_and_exit() {
        // Stdout closes at 2.5 s, then the program lingers: the 3 s timeout still counts from
        // the start, so the answer comes at ~3 s; a fresh timeout once output is complete
        // would answer at 5.5 s or later. The bound sits halfway.
        let started = Instant::now();
        let err = run_alone(
            job(
                "/bin/sh",
                &["-c", "sleep 2.5; exec >&-; sleep 100"],
                3_000,
                1024,
            ),
            Bytes::new(),
        )
        .await;
        assert!(matches!(err, Err(OpError::Timeout(_))), "{err:?}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(4_250),
            "answered after {took:?}"
        );
    }

    #[tokio::test]
    async fn what_a_finished_job_left_in_its_group_is_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let out = run_alone(
            with_grandchild(&pidfile, "echo done", 5_000, 1024),
            Bytes::new(),
        );
        assert_eq!(out.await.unwrap(), b"done\n".as_slice());
        assert_gone(read_pid(&pidfile).await).await;
    }

    #[tokio::test]
    async fn a_dropped_job_kills_its_whole_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        // The background child keeps stdout open, as a careless script's would.
        let script = format!("sleep 30 & echo $! > '{}'; wait", pidfile.display());
        let groups = JobGroups::default();
        let task = tokio::spawn(run(
            job("/bin/sh", &["-c", &script], 60_000, 1024),
            Bytes::new(),
            groups.clone(),
        ));
        let pid = read_pid(&pidfile).await;
        assert_eq!(groups.running(), 1);
        // The request is abandoned: its future is dropped.
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_gone(pid).await;
        assert_eq!(groups.running(), 0);
    }

    #[tokio::test]
    async fn a_stopping_worker_kills_running_jobs_and_starts_no_more() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let groups = JobGroups::default();
        let task = tokio::spawn(run(
            with_grandchild(&pidfile, "wait", 60_000, 1024),
            Bytes::new(),
            groups.clone(),
        ));
        let pid = read_pid(&pidfile).await;
        assert_eq!(groups.kill_all(), 1);
        let ended = tokio::time::timeout(WAIT, task).await.expect("job ends");
        assert_eq!(
            ended.unwrap(),
            Err(OpError::Failed("job t was killed by signal 9".into()))
        );
        assert_gone(pid).await;
        let late = run(
            job("/bin/echo", &[], 5_000, 1024),
            Bytes::new(),
            groups.clone(),
        )
        .await;
        assert!(
            matches!(&late, Err(OpError::Failed(m)) if m.contains("stopping")),
            "{late:?}"
        );
        assert_eq!(groups.running(), 0);
    }

    /// Jobs that close stdout and keep running hold no thread while the worker waits for them
    /// to exit: with two blocking threads and four such jobs, another job's exit is still seen
    /// (a blocking wait per job left it waiting for a thread until its timeout).
    #[test]
    fn lingering_jobs_do_not_starve_other_jobs() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(2)
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = rt.block_on(async {
            let groups = JobGroups::default();
            let lingering: Vec<_> = (0..4)
                .map(|i| {
                    // The marker is written once stdout is closed.
                    let marker = tmp.path().join(i.to_string());
                    let script = format!("exec >&-; : > '{}'; exec sleep 60", marker.display());
                    tokio::spawn(run(
                        job("/bin/sh", &["-c", &script], 60_000, 1024),
                        Bytes::new(),
                        groups.clone(),
                    ))
                })
                .collect();
            // All four have closed stdout, so on the next turn of the reactor each job sees
            // EOF and starts waiting for its exit, before `cat` below can have exited.
            let deadline = Instant::now() + WAIT;
            while (0..4).any(|i| !tmp.path().join(i.to_string()).exists()) {
                assert!(
                    Instant::now() < deadline,
                    "the lingering jobs did not start"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let started = Instant::now();
            let out = run(
                job("/bin/cat", &[], 20_000, 1024),
                Bytes::from_static(b"hello"),
                groups.clone(),
            )
            .await;
            let took = started.elapsed();
            for task in lingering {
                task.abort();
                assert!(task.await.unwrap_err().is_cancelled());
            }
            assert_eq!(groups.running(), 0);
            (out, took)
        });
        // Bounded, in case blocking waits are still waiting for their (killed) jobs.
        rt.shutdown_timeout(WAIT);
        let (out, took) = out;
        assert_eq!(out.unwrap(), b"hello".as_slice());
        assert!(took < Duration::from_secs(10), "answered after {took:?}");
    }

    #[tokio::test]
    async fn missing_program_is_a_clean_error() {
        let err = run_alone(job("/nonexistent/prog", &[], 5_000, 1000), Bytes::new()).await;
        assert!(matches!(err, Err(OpError::Failed(_))));
    }
}
