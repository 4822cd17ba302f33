//! Ctrl-C during a `certs` command: the change is made whole or not at all, and none of its
//! staged files (private keys among them) is left in the directory under a temporary name.

mod common;

use common::{WAIT, bin};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Workers enough that staging the set takes a while (777 files, each synced).
const WORKERS: &str = "256";
/// Files `certs init --workers 256` writes: CA, dispatcher, watchdog and client (4 pairs),
/// 256 worker pairs, `token.key` and 256 `worker-N.token`.
const FILES: usize = 4 * 2 + 256 * 2 + 1 + 256;

/// The names in `dir` that start with a dot: staged files and copies set aside.
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn visible(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn ctrl_c_while_certs_init_stages_its_files_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A run may finish before the poll sees a staged file: try again, a few times.
    for attempt in 0..5 {
        let dir = tmp.path().join(format!("certs{attempt}"));
        let dir_arg = dir.to_string_lossy().into_owned();
        let mut child = Command::new(bin())
            .args(["certs", "init", "--dir", &dir_arg, "--workers", WORKERS])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let start = Instant::now();
        // A staged file in the directory: the command is between its first write and its
        // commit (or past it, if the poll is late; then it must finish the set).
        let caught = loop {
            if !hidden(&dir).is_empty() {
                break true;
            }
            if child.try_wait().expect("try_wait").is_some() {
                break false;
            }
            assert!(
                start.elapsed() < WAIT,
                "certs init neither staged nor ended"
            );
            std::thread::yield_now();
        };
        if !caught {
            continue;
        }
        kill(pid, Signal::SIGINT).expect("SIGINT");
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(hidden(&dir), Vec::<String>::new(), "left behind; {err}");
        match out.status.code() {
            Some(130) => {
                assert_eq!(visible(&dir), 0, "a part of the set was put in place");
                assert!(err.contains("nothing was changed"), "{err}");
            }
            Some(0) => assert_eq!(visible(&dir), FILES, "{err}"),
            other => panic!("certs init ended with {other:?} ({:?}): {err}", out.status),
        }
        return;
    }
    panic!("certs init always finished before a staged file was seen");
}
