//! Processes a dead component left behind.
//!
//! A worker kills its jobs' process groups however a job ends, but a worker killed by SIGKILL
//! cannot: its jobs (and whatever they started) would run on, re-parented to init. So the
//! watchdog makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphans of its
//! descendants become its own children. Each supervised component starts a session of its own
//! (`child::prepare_supervised`), whose ID is the component's PID and which its jobs inherit, so an
//! orphan tells by its session whose it is. [`sweep`] then:
//! - kills (with the process group it leads, if it leads one) and reaps every orphan whose
//!   component is dead;
//! - leaves alone the orphans of live components (a job's child whose parent exited, while the
//!   job still runs: its worker deals with its group);
//! - only reaps, when they have exited, the orphans of anything else (a watchdog that is PID 1
//!   in a container adopts every orphan there).
//!
//! At its exit [`sweep_all`] kills every child left but those the watchdog had before it
//! started any component ([`children_now`]): children of the process that `exec`ed it, such as
//! a shell's `sleep 300 & exec securesrv watchdog`, or the reader of `2> >(logger)`.
//!
//! A child's PID cannot be reused before its parent reaps it, so signalling a child found in
//! `/proc` (or the group it leads) cannot hit an unrelated process.

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::collections::HashSet;

/// Makes this process a child subreaper. Only the watchdog command calls it: the watchdog
/// sweeps its children when it is one (see [`sweep`]), killing those of dead components and
/// reaping any other that has exited.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Whether this process is a child subreaper (and so should sweep).
pub fn is_subreaper() -> bool {
    nix::sys::prctl::get_child_subreaper().unwrap_or(false)
}

/// One child of ours, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// State letter: `Z` for a zombie, which only needs reaping.
    pub state: char,
    /// Parent PID.
    pub ppid: u32,
    /// Process group ID.
    pub pgrp: u32,
    /// Session ID.
    pub session: u32,
    /// When it started, in clock ticks after boot (`None` if the line is cut short): with the
    /// PID, which process this is, even once the PID has been used again.
    pub start: Option<u64>,
}

/// Parses the fields after the command name, which is in parentheses and may itself contain
/// spaces and parentheses: `PID (COMM) STATE PPID PGRP ...`.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    // Field 22 of the line; the session was field 6.
    let start = fields.nth(15).and_then(|f| f.parse().ok());
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        session,
        start,
    })
}

/// This process's children now, each by its PID and start time. The watchdog takes them
/// before it starts any component: they are not its components' leftovers, and
/// [`sweep_all`] leaves them be.
pub fn children_now() -> HashSet<(u32, u64)> {
    children(&HashSet::new())
        .into_iter()
        .filter_map(|(pid, stat)| Some((pid, stat.start?)))
        .collect()
}

/// Children of this process that are not in `live` (PIDs of live components): from `/proc`.
fn children(live: &HashSet<u32>) -> Vec<(u32, ProcStat)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && !live.contains(pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?))
        })
        .filter(|(_, s)| s.ppid == me)
        .collect()
}

/// Sweeps this process's children: `live` are the PIDs of live components (never touched),
/// `dead` those of components that have exited (their sessions' orphans are killed). Returns
/// how many children it killed or reaped.
pub fn sweep(live: &HashSet<u32>, dead: &HashSet<u32>) -> usize {
    sweep_where(live, |_, stat| dead.contains(&stat.session))
}

/// [`sweep`] for the watchdog's exit, once every component is reaped: every child left is
/// an orphan of theirs, including one that left its component's session (a job's daemon,
/// started with `setsid`), which [`sweep`] cannot tell from a live component's. All but
/// those that cannot be: `inherited`, the children it had before it started any component
/// ([`children_now`]), and any in the watchdog's own session, which no component's
/// descendant can join (each component leads a session of its own): a child of one of those
/// that the watchdog adopted once its parent exited. Those are only reaped once they have
/// exited. Returns how many processes it killed or reaped.
pub fn sweep_all(live: &HashSet<u32>, inherited: &HashSet<(u32, u64)>) -> usize {
    let own_session = nix::unistd::getsid(None).map_or(0, |s| s.as_raw() as u32);
    sweep_where(live, |pid, stat| {
        stat.session != own_session
            && stat
                .start
                .is_none_or(|start| !inherited.contains(&(pid, start)))
    })
}

fn sweep_where(live: &HashSet<u32>, orphaned: impl Fn(u32, &ProcStat) -> bool) -> usize {
    let own_group = nix::unistd::getpgrp().as_raw() as u32;
    let mut acted = 0;
    for (pid, stat) in children(live) {
        let raw = Pid::from_raw(pid as i32);
        let zombie = stat.state == 'Z';
        if orphaned(pid, &stat) {
            if stat.pgrp == pid && stat.pgrp != own_group {
                // A group leader, as each job is, even as a zombie (it still holds the group):
                // everything in its group goes with it.
                let _ = killpg(raw, Signal::SIGKILL);
            }
            if !zombie {
                tracing::warn!(
                    pid,
                    pgrp = stat.pgrp,
                    component_pid = stat.session,
                    "killing a process a dead component left behind"
                );
                let _ = kill(raw, Signal::SIGKILL);
            }
        } else if !zombie {
            // A live component's, or nobody's we know: not ours to kill.
            continue;
        }
        acted += 1;
        let _ = waitpid(raw, Some(WaitPidFlag::WNOHANG));
    }
    acted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_parsed_after_the_last_parenthesis() {
        assert_eq!(
            parse_stat("4242 (sh) S 17 4242 17 0 -1 4194560 ..."),
            Some(ProcStat {
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                session: 17,
                start: None
            })
        );
        let line = "30 (sleep) S 1 30 30 0 -1 4194304 97 0 0 0 0 0 0 0 20 0 1 0 51234 2371584";
        assert_eq!(parse_stat(line).and_then(|s| s.start), Some(51234));
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat(&me).and_then(|s| s.start).is_some());
        // A command name can hold spaces and parentheses.
        assert_eq!(
            parse_stat("9 (a (b) c) R 1 3 5 0"),
            Some(ProcStat {
                state: 'R',
                ppid: 1,
                pgrp: 3,
                session: 5,
                start: None
            })
        );
        assert_eq!(parse_stat("9 (x) R 1 3"), None);
        assert_eq!(parse_stat("garbage"), None);
    }
}
