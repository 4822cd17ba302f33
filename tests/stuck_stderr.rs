//! A watchdog whose stderr takes nothing (a pipe nobody reads, already full): it still stops
//! on SIGTERM, after its components, with exit code 0, and at once on a second signal, with
//! 130. Every wait is bounded and every process is killed by PID at the end.

mod common;

use common::{WAIT, alive, free_port_block, pki};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A pipe already full, whose read end the test keeps and never reads: a stderr that takes
/// nothing. Close-on-exec, so that no other process inherits an end.
fn stuck_pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    fcntl(&w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut file = std::fs::File::from(w);
    for piece in [4096, 1] {
        while file.write(&vec![b'.'; piece]).is_ok() {}
    }
    let w = OwnedFd::from(file);
    fcntl(&w, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (r, w)
}

/// The PIDs of `pid`'s children.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().nth(1))
                    == Some(pid.to_string().as_str())
            })
        })
        .collect()
}

/// A watchdog with 2 workers, its stderr stuck, its stdout read up to its ready line.
struct Stuck {
    child: Child,
    components: Vec<u32>,
    _read_end: OwnedFd,
    _pki: common::Pki,
}

impl Stuck {
    fn start() -> Stuck {
        let pki = pki(2);
        let base = free_port_block(2);
        let cfg = format!(
            "certs_dir = {:?}\nworkers = 2\n[dispatcher]\nlisten = \"127.0.0.1:{base}\"\n\
             [watchdog]\nheartbeat_interval_ms = 300\nheartbeat_timeout_ms = 300\n\
             stop_grace_ms = 3000\n",
            pki.dir
        );
        std::fs::write(pki.tmp.path().join("securesrv.toml"), cfg).unwrap();
        let (read_end, write_end) = stuck_pipe();
        let mut child = Command::new(common::bin())
            .args(["--config", "securesrv.toml", "watchdog"])
            .current_dir(pki.tmp.path())
            .env("SECURESRV_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(write_end))
            .spawn()
            .expect("spawn securesrv");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("securesrv ready") {
                    let _ = tx.send(());
                }
            }
        });
        let mut stuck = Stuck {
            components: vec![],
            child,
            _read_end: read_end,
            _pki: pki,
        };
        rx.recv_timeout(WAIT)
            .expect("the watchdog is ready although its stderr takes nothing");
        stuck.components = children_of(stuck.child.id());
        assert_eq!(stuck.components.len(), 3, "{:?}", stuck.components);
        stuck
    }

    fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Its exit status, if it exits within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        for pid in self.components.iter().chain([&self.child.id()]) {
            if alive(*pid) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        let _ = self.wait_exit(Duration::from_secs(5));
    }
}

/// The watchdog's process stayed alive for ever after "watchdog stopped", its main thread
/// waiting for a log flusher blocked on the pipe, and a second signal did nothing; each
/// component was SIGKILLed after its whole stop grace for the same reason. Found by an
/// environment review.
#[test]
fn sigterm_stops_a_watchdog_whose_stderr_takes_nothing() {
    let mut w = Stuck::start();
    w.signal(Signal::SIGTERM);
    let status = w
        .wait_exit(WAIT)
        .expect("the watchdog exits after SIGTERM although its stderr takes nothing");
    assert_eq!(status.code(), Some(0));
    let gone = common::wait_until(WAIT, || w.components.iter().all(|p| !alive(*p)));
    assert!(gone, "components outlived the watchdog");
}

#[test]
fn a_second_signal_stops_a_watchdog_whose_stderr_takes_nothing_at_once() {
    let mut w = Stuck::start();
    w.signal(Signal::SIGTERM);
    w.signal(Signal::SIGINT);
    let status = w
        .wait_exit(WAIT)
        .expect("the watchdog exits on a second signal although its stderr takes nothing");
    assert_eq!(status.code(), Some(130));
    let gone = common::wait_until(WAIT, || w.components.iter().all(|p| !alive(*p)));
    assert!(gone, "components outlived the watchdog");
}
