//! Processes a dead component left behind.
//!
//! A worker kills its jobs' process groups however a job ends, but a worker killed by SIGKILL
//! cannot: its jobs (and whatever they started) would run on, re-parented to init. The
//! watchdog therefore makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphans of its
//! components become its own children instead. Every child that is not a component it started
//! is such an orphan; [`sweep`] kills it (its whole process group when it leads one, as a job
//! does) and reaps it.
//!
//! A child's PID cannot be reused before its parent reaps it, so signalling a child found in
//! `/proc` (or the group it leads) cannot hit an unrelated process.

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::collections::HashSet;

/// Makes this process a child subreaper. Only the watchdog command calls it: a process that
/// is one treats every child it did not start as an orphan to kill (see [`sweep`]).
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
}

/// Parses the fields after the command name, which is in parentheses and may itself contain
/// spaces and parentheses: `PID (COMM) STATE PPID PGRP ...`.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid, pgrp })
}

/// Children of this process that are not in `components`: PIDs from `/proc`.
fn orphans(components: &HashSet<u32>) -> Vec<(u32, ProcStat)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && !components.contains(pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?))
        })
        .filter(|(_, s)| s.ppid == me)
        .collect()
}

/// Kills and reaps every child that is not one of `components`; returns how many it found.
/// One that has not died by the time it is signalled is reaped by a later sweep.
pub fn sweep(components: &HashSet<u32>) -> usize {
    let found = orphans(components);
    let own_group = nix::unistd::getpgrp().as_raw() as u32;
    for (pid, stat) in &found {
        let raw = Pid::from_raw(*pid as i32);
        if stat.state != 'Z' {
            tracing::warn!(
                pid,
                pgrp = stat.pgrp,
                "killing a process a dead component left behind"
            );
            if stat.pgrp == *pid && stat.pgrp != own_group {
                // A group leader, as each job is: everything it started goes with it.
                let _ = killpg(raw, Signal::SIGKILL);
            }
            let _ = kill(raw, Signal::SIGKILL);
        }
        let _ = waitpid(raw, Some(WaitPidFlag::WNOHANG));
    }
    found.len()
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
                pgrp: 4242
            })
        );
        // A command name can hold spaces and parentheses.
        assert_eq!(
            parse_stat("9 (a (b) c) R 1 3 3 0"),
            Some(ProcStat {
                state: 'R',
                ppid: 1,
                pgrp: 3
            })
        );
        assert_eq!(parse_stat("9 (x) R"), None);
        assert_eq!(parse_stat("garbage"), None);
    }
}
