//! A job's process group, killed whenever the job ends, and the registry through which a
//! stopping worker kills the groups of the jobs still running.
//!
//! A job runs in a process group of its own, led by the program the worker started. However
//! the job ends — the program exits, it runs past its timeout, it writes too much, its request
//! is abandoned and its future dropped, the worker stops — the whole group gets SIGKILL, so
//! nothing the program started outlives the job.
//!
//! A group's id is its leader's pid, which may be reused once the leader has been reaped and
//! no other member is left. So the group is signalled only while the leader is not reaped yet
//! (running, or a zombie noticed with `WNOWAIT`): until then the id names this job's group and
//! nobody else's. A job leaves the registry before its leader is reaped, for the same reason.
//!
//! A worker killed with SIGKILL runs none of this: its jobs' groups live on (see SECURITY.md).

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::io;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::signal::unix::{SignalKind, signal};

/// The process groups of the jobs one worker is running. Clones share the registry.
#[derive(Debug, Clone, Default)]
pub struct JobGroups(Arc<Mutex<Groups>>);

#[derive(Debug, Default)]
struct Groups {
    /// Groups whose leader has not been reaped: signalling them cannot hit another process.
    live: HashSet<Pid>,
    /// Set once the worker is stopping: a job that starts afterwards is killed at once, so a
    /// request that was still on its way to starting one cannot leave it behind.
    closed: bool,
}

impl JobGroups {
    fn lock(&self) -> MutexGuard<'_, Groups> {
        // A panic elsewhere must not stop jobs from being killed.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends SIGKILL to the process group of every job running now, and makes every job
    /// started from now on fail (its group killed at once). The worker calls this on its way
    /// out. Returns how many jobs were running.
    pub fn kill_all(&self) -> usize {
        let mut groups = self.lock();
        groups.closed = true;
        for pgid in &groups.live {
            let _ = killpg(*pgid, Signal::SIGKILL);
        }
        groups.live.len()
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.lock().live.len()
    }
}

/// Why a job did not start.
#[derive(Debug)]
pub(super) enum StartError {
    /// The program could not be started.
    Spawn(std::io::Error),
    /// The worker is stopping ([`JobGroups::kill_all`] was called).
    Stopping,
}

/// A running job: its direct child, which leads its process group. Dropped before
/// [`JobProcess::finish`], it kills the whole group.
pub(super) struct JobProcess {
    /// Unreaped until `finish` (dropped unreaped, tokio kills and reaps it in the background).
    child: Child,
    /// The leader's pid, which is the group's id.
    pgid: Pid,
    groups: JobGroups,
    /// The group was killed and left the registry.
    ended: bool,
}

impl JobProcess {
    /// Starts `cmd` as the leader of a new process group registered in `groups`.
    pub(super) fn spawn(cmd: &mut Command, groups: &JobGroups) -> Result<Self, StartError> {
        let child = cmd
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(StartError::Spawn)?;
        let Some(pid) = child.id() else {
            // Only a reaped child has no pid; not one that was just started.
            return Err(StartError::Spawn(std::io::Error::other(
                "started job has no pid",
            )));
        };
        let job = JobProcess {
            child,
            pgid: Pid::from_raw(pid as i32),
            groups: groups.clone(),
            ended: false,
        };
        let registered = {
            let mut g = groups.lock();
            if !g.closed {
                g.live.insert(job.pgid);
            }
            !g.closed
        };
        if registered {
            Ok(job)
        } else {
            // Dropping `job` kills its group.
            Err(StartError::Stopping)
        }
    }

    /// The job's stdin and stdout pipes (once).
    pub(super) fn take_stdio(&mut self) -> (Option<ChildStdin>, Option<ChildStdout>) {
        (self.child.stdin.take(), self.child.stdout.take())
    }

    /// Waits until the leader has exited, leaving it unreaped (a zombie), so that its group
    /// can still be killed safely.
    ///
    /// No thread is held while waiting: a job may run for its whole timeout with its stdout
    /// closed, and a blocking `waitid` per such job once used up tokio's blocking threads, so
    /// that other jobs' exits went unseen until their timeouts. Instead, the leader is checked
    /// with `waitid(WNOHANG | WNOWAIT)`, which neither blocks nor reaps, once at the start and
    /// after every SIGCHLD the worker receives. Each SIGCHLD thus costs one such call per job
    /// waiting; tokio delivers SIGCHLDs that arrive together as one. (A pidfd would wake only
    /// its own job, but nix 0.30 cannot open one, and tokio registers a raw descriptor only
    /// through `unsafe` code.)
    pub(super) async fn exited(&self) -> io::Result<()> {
        // Subscribed before the first check, so an exit just after that check is not missed.
        let mut sigchld = signal(SignalKind::child())?;
        while !has_exited(self.pgid)? {
            if sigchld.recv().await.is_none() {
                return Err(io::Error::other("SIGCHLD notifications ended"));
            }
        }
        Ok(())
    }

    /// Whether the leader has exited, now, without waiting or reaping it.
    pub(super) fn has_exited_now(&self) -> bool {
        has_exited(self.pgid).unwrap_or(false)
    }

    /// Kills whatever is left of the group, then reaps the leader and returns its status (the
    /// leader's own status if it had exited already, SIGKILL otherwise).
    pub(super) async fn finish(mut self) -> io::Result<ExitStatus> {
        self.kill_group();
        self.child.wait().await
    }

    /// Kills the group and removes it from the registry; the leader must still be unreaped
    /// (running, or exited as [`JobProcess::exited`] saw it). Called again, does nothing.
    pub(super) fn kill_group(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut groups = self.groups.lock();
        groups.live.remove(&self.pgid);
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

/// Whether the child `pid` has exited, without waiting and without reaping it.
fn has_exited(pid: Pid) -> io::Result<bool> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
    loop {
        match waitid(Id::Pid(pid), flags) {
            Err(Errno::EINTR) => continue,
            Ok(WaitStatus::StillAlive) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if !self.ended {
            tracing::debug!(pgid = %self.pgid, "job abandoned before it finished; killing its process group");
            self.kill_group();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use std::time::Duration;

    /// Upper bound on every wait in these tests.
    const WAIT: Duration = Duration::from_secs(10);

    /// The state letter of process `pid` in /proc (`Z` for a zombie).
    fn state(pid: Pid) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The state follows the command name in parentheses.
        Some(
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    }

    /// The wait sees the exit, and leaves the leader unreaped (so its group may still be
    /// killed), until `finish` reaps it.
    #[tokio::test]
    async fn the_wait_sees_the_exit_and_leaves_the_leader_unreaped() {
        let groups = JobGroups::default();
        // `cat` exits when its stdin closes, not before.
        let mut cmd = Command::new("/bin/cat");
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        let mut job = JobProcess::spawn(&mut cmd, &groups).expect("cat starts");
        let (stdin, _) = job.take_stdio();
        let pid = job.pgid;
        {
            let mut exited = std::pin::pin!(job.exited());
            // Not while `cat` still waits for input.
            let early = tokio::time::timeout(Duration::from_millis(200), &mut exited).await;
            assert!(early.is_err(), "exit seen before it happened");
            drop(stdin);
            tokio::time::timeout(WAIT, exited)
                .await
                .expect("the exit is seen")
                .expect("the wait works");
        }
        assert_eq!(state(pid).as_deref(), Some("Z"));
        let status = tokio::time::timeout(WAIT, job.finish())
            .await
            .expect("reaped");
        assert!(status.expect("a status").success());
        assert_eq!(groups.running(), 0);
    }
}
