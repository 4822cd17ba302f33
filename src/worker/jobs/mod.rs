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
use tokio::process::{ChildStdout, Command};
use tokio::time::Instant;

/// Runs `job` with `payload` on stdin, its process group registered in `groups`; the answer
/// is its stdout.
///
/// One deadline, set here, bounds the whole job: feeding stdin, collecting stdout and waiting
/// for the program to exit. The job ends when the program exits, not when its stdout closes
/// (something it left running may hold stdout): its group is killed, the output still in the
/// pipe is read (for `DRAIN_AFTER_EXIT` at most), and the answer is that output, or the
/// program's own exit status if it failed.
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
    let (stdin, mut stdout) = process.take_stdio();
    let cap = output_cap(&job);
    let mut out = Vec::new();
    let mut chunk = vec![0; READ_CHUNK];
    // Until the program exits: feed stdin, collect stdout (`stdout` becomes None at EOF) and
    // watch for the exit, all at once. The exit is not inferred from stdout closing: a child
    // the program left behind may hold stdout open long after the program is gone.
    let stage = {
        let feed = async move {
            if let Some(mut s) = stdin {
                // A job that does not read its input is not an error: once it has exited, the
                // rest of the payload meets a closed pipe (EPIPE) and is dropped.
                let _ = s.write_all(&payload).await;
            }
        };
        let mut feed = pin!(feed);
        let mut fed = false;
        let mut exited = pin!(process.exited());
        let mut timeout = pin!(tokio::time::sleep_until(deadline));
        loop {
            tokio::select! {
                read = read_chunk(&mut stdout, &mut chunk), if stdout.is_some() => match read {
                    Ok(0) => stdout = None,
                    Ok(n) => {
                        out.extend_from_slice(&chunk[..n]);
                        if out.len() > cap {
                            break Stage::TooLarge;
                        }
                    }
                    Err(e) => break Stage::ReadFailed(e),
                },
                // Stdin is fed until the program exits, even once stdout has closed: it may
                // still be reading. Past the cap, or if stdout failed, the job is over and
                // stdin is dropped with `feed` (a program that never reads would keep the
                // write blocked).
                () = &mut feed, if !fed => fed = true,
                e = &mut exited => break e.map_or_else(Stage::WaitFailed, |()| Stage::Exited),
                () = &mut timeout => break Stage::TimedOut,
            }
        }
    };
    // An exit seen only after the deadline, whichever of the two this task took first: the
    // worker itself did not run for a while (stopped, or starved of CPU), or the exit came at
    // the deadline. A timeout, as the job's own limit says, but not killed, and not said to
    // be (found by a chaos test that stopped a worker: it was said, or the output given, at
    // random).
    let unseen = match stage {
        Stage::Exited => Instant::now() >= deadline,
        Stage::TimedOut => process.has_exited_now(),
        _ => false,
    };
    if unseen {
        let _ = process.finish().await;
        return Err(OpError::Timeout(format!(
            "job {} had exited, but was not seen to within its {} ms (the worker was held \
             up, or the exit came at the deadline)",
            job.name, job.timeout_ms
        )));
    }
    match stage {
        Stage::Exited => {}
        Stage::TimedOut => {
            let _ = process.finish().await;
            return Err(OpError::Timeout(if stdout.is_some() {
                format!(
                    "job {} ran longer than {} ms and was killed",
                    job.name, job.timeout_ms
                )
            } else {
                format!(
                    "job {} did not exit within {} ms and was killed",
                    job.name, job.timeout_ms
                )
            }));
        }
        Stage::TooLarge => {
            let _ = process.finish().await;
            return Err(too_large(&job));
        }
        Stage::ReadFailed(e) => {
            let _ = process.finish().await;
            return Err(read_failed(&job, &e));
        }
        Stage::WaitFailed(e) => {
            let _ = process.finish().await;
            return Err(OpError::Failed(format!("job {}: {e}", job.name)));
        }
    }
    // The program has exited: whatever it left running in its group is killed now (the
    // leader is still unreaped, so the group id is still the job's).
    process.kill_group();
    // Read what is left in the pipe. The group is dead, so EOF follows at once, unless a
    // process that left the group (`setsid`) still holds stdout: that one does not get to hold
    // the answer, which is then the output read so far.
    let drain_until = deadline.min(Instant::now() + DRAIN_AFTER_EXIT);
    let drained = tokio::time::timeout_at(drain_until, async {
        while let Some(s) = stdout.as_mut() {
            match s.read(&mut chunk).await? {
                0 => stdout = None,
                n => {
                    out.extend_from_slice(&chunk[..n]);
                    if out.len() > cap {
                        break;
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match drained {
        Err(_) => {
            tracing::warn!(job = %job.name, "job exited, but a process outside its group still holds its stdout; answering with the output read so far");
        }
        Ok(Err(e)) => {
            let _ = process.finish().await;
            return Err(read_failed(&job, &e));
        }
        Ok(Ok(())) => {}
    }
    if out.len() > cap {
        let _ = process.finish().await;
        return Err(too_large(&job));
    }
    // Reaped now: the leader's own exit status.
    let status = match process.finish().await {
        Ok(status) => status,
        Err(e) => return Err(OpError::Failed(format!("job {}: {e}", job.name))),
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

/// Bytes read from a job's stdout at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How long the rest of a job's output may take to arrive once the program has exited and its
/// group was killed. What is already in the pipe is read at once, and the group's members
/// close their end as they die; only a process outside the group can make this wait run out.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// How the first stage of a job (until the program exits) ended.
enum Stage {
    /// The program exited; its stdout may still be open.
    Exited,
    /// The job's deadline passed first.
    TimedOut,
    /// Stdout went past the output cap.
    TooLarge,
    /// Reading stdout failed.
    ReadFailed(std::io::Error),
    /// Waiting for the program's exit failed.
    WaitFailed(std::io::Error),
}

/// Reads the next bytes of `stdout` into `chunk` (0 at EOF); never ready if it is closed.
async fn read_chunk(stdout: &mut Option<ChildStdout>, chunk: &mut [u8]) -> std::io::Result<usize> {
    match stdout {
        Some(s) => s.read(chunk).await,
        None => std::future::pending().await,
    }
}

/// The cap on a job's output: as settled when the worker took its configuration, else the
/// default (a `JobConfig` an embedding program made without one).
fn output_cap(job: &JobConfig) -> usize {
    job.max_output_bytes
        .unwrap_or(crate::config::DEFAULT_JOB_OUTPUT)
}

/// The answer when a job wrote more than its cap.
fn too_large(job: &JobConfig) -> OpError {
    OpError::TooLarge(format!(
        "job {} wrote more than {} bytes",
        job.name,
        output_cap(job)
    ))
}

/// The answer when a job's stdout could not be read (logged here, not passed on).
fn read_failed(job: &JobConfig, e: &std::io::Error) -> OpError {
    tracing::warn!(job = %job.name, error = %e, "cannot read job output");
    OpError::Failed(format!("job {}: its output could not be read", job.name))
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
            max_output_bytes: Some(cap),
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

    /// `/bin/sh -c` running `sleep 30` in the background with the job's stdout (its pid
    /// written to `pidfile`), then `rest`: the program exits while its child holds stdout.
    fn with_child_holding_stdout(pidfile: &Path, rest: &str) -> Arc<JobConfig> {
        let script = format!("sleep 30 & echo $! > '{}'; {rest}", pidfile.display());
        job("/bin/sh", &["-c", &script], 20_000, 100_000)
    }

    #[tokio::test]
    async fn a_job_ends_when_its_program_exits_though_a_child_holds_stdout() {
        // All of the output counts, also what is still in the pipe when the exit is seen.
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let started = Instant::now();
        let out = run_alone(
            with_child_holding_stdout(&pidfile, "head -c 60000 /dev/zero"),
            Bytes::new(),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(out.unwrap(), vec![0; 60_000].as_slice());
        // Well before the job's 20 s timeout.
        assert!(took < Duration::from_secs(10), "answered after {took:?}");
        assert_gone(read_pid(&pidfile).await).await;
    }

    #[tokio::test]
    async fn a_job_whose_child_holds_stdout_answers_with_the_programs_status() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let started = Instant::now();
        let err = run_alone(
            with_child_holding_stdout(&pidfile, "echo started; exit 4"),
            Bytes::new(),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(
            err,
            Err(OpError::Failed("job t exited with status 4".into()))
        );
        assert!(took < Duration::from_secs(10), "answered after {took:?}");
        assert_gone(read_pid(&pidfile).await).await;
    }

    #[tokio::test]
    async fn a_process_that_left_the_group_does_not_hold_the_answer() {
        // `setsid` takes the child out of the group, so the group kill misses it and it keeps
        // stdout open; the answer comes anyway, shortly after the program exits.
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let script = format!(
            "setsid sleep 30 & echo $! > '{}'; echo started",
            pidfile.display()
        );
        let started = Instant::now();
        let out = run_alone(job("/bin/sh", &["-c", &script], 20_000, 1024), Bytes::new()).await;
        let took = started.elapsed();
        // Not the job's to kill; the test cleans up before it asserts anything.
        let escaped = read_pid(&pidfile).await;
        let _ = kill(escaped, Signal::SIGKILL);
        assert_eq!(out.unwrap(), b"started\n".as_slice());
        assert!(took < Duration::from_secs(10), "answered after {took:?}");
    }

    #[tokio::test]
    async fn missing_program_is_a_clean_error() {
        let err = run_alone(job("/nonexistent/prog", &[], 5_000, 1000), Bytes::new()).await;
        assert!(matches!(err, Err(OpError::Failed(_))));
    }

    /// A worker that did not run for longer than a job's timeout (stopped with SIGSTOP, here
    /// its thread blocked) finds the job's exit and its deadline due together, and took
    /// either, at random: after the deadline it said the job "ran longer than ... and was
    /// killed", although the job had exited long before, or it gave the job's output (found
    /// by a chaos test). Now always a timeout that says the job had exited.
    #[tokio::test(flavor = "current_thread")]
    async fn a_job_that_exited_while_its_worker_was_held_up_is_not_said_to_be_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let (pidfile, go) = (tmp.path().join("pid"), tmp.path().join("go"));
        // The job exits only once told to, so that its task cannot see it exit before this
        // thread is held up.
        let script = format!(
            "while [ ! -e '{}' ]; do sleep 0.01; done; echo $$ > '{}'; echo out",
            go.display(),
            pidfile.display()
        );
        for _ in 0..4 {
            let _ = std::fs::remove_file(&pidfile);
            let _ = std::fs::remove_file(&go);
            let timeout = Duration::from_millis(50);
            let started = std::time::Instant::now();
            let task = tokio::spawn(run(
                job("/bin/sh", &["-c", &script], 50, 1024),
                Bytes::new(),
                JobGroups::default(),
            ));
            // The job starts at the task's first poll; then this thread, the runtime's only
            // one, is held up until the job has exited (a zombie: the worker reaps it only
            // at the end) and its timeout has passed.
            tokio::task::yield_now().await;
            std::fs::write(&go, b"").unwrap();
            let until = std::time::Instant::now() + WAIT;
            let exited = loop {
                let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
                if stat.is_ok_and(|s| s.rsplit(')').next().unwrap().trim_start().starts_with('Z')) {
                    break true;
                }
                if std::time::Instant::now() >= until {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            assert!(exited, "the job did not exit");
            std::thread::sleep(timeout.saturating_sub(started.elapsed()) + timeout);
            let answer = tokio::time::timeout(WAIT, task)
                .await
                .expect("job ends")
                .unwrap();
            match &answer {
                Err(OpError::Timeout(m)) => {
                    assert!(!m.contains("killed") && m.contains("had exited"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
