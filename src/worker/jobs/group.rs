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
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

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
    /// can still be killed safely. The wait runs on a blocking thread, which ends when the
    /// leader does — also if this future is dropped, since the group is killed then.
    pub(super) async fn exited(&self) -> std::io::Result<()> {
        let pid = self.pgid;
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        tokio::task::spawn_blocking(move || {
            loop {
                match waitid(Id::Pid(pid), flags) {
                    Err(Errno::EINTR) => continue,
                    r => return r.map(drop),
                }
            }
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::from)
    }

    /// Kills whatever is left of the group, then reaps the leader and returns its status (the
    /// leader's own status if it had exited already, SIGKILL otherwise).
    pub(super) async fn finish(mut self) -> std::io::Result<ExitStatus> {
        self.end();
        self.child.wait().await
    }

    /// Kills the group and removes it from the registry; the leader must still be unreaped.
    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut groups = self.groups.lock();
        groups.live.remove(&self.pgid);
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if !self.ended {
            tracing::debug!(pgid = %self.pgid, "job abandoned before it finished; killing its process group");
            self.end();
        }
    }
}
