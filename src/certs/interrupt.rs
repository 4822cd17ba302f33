//! Ctrl-C (SIGINT), SIGTERM and SIGHUP during a `certs` command. Left to their default
//! action, they ended the process wherever it was: between two renames of a change (a key
//! beside another key's certificate, a rotated `worker-N.token` beside the old `token.key`),
//! or with the staged files — private keys among them — left in the directory under
//! temporary names for good. [`hold`] keeps them pending instead; `check`, called before
//! the first file of a change is put in place, abandons the change (its staged files are
//! removed as they are dropped) if one came. After that point the change is finished first.

use super::CertError;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::sync::OnceLock;

/// The signals held back, as the components' shutdown handles them.
const HELD: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Where the held signals wait to be read; unset unless [`hold`] ran.
static PENDING: OnceLock<SignalFd> = OnceLock::new();

/// Holds SIGINT, SIGTERM and SIGHUP back for the rest of the process. Call it before any
/// thread starts (a thread started earlier would still take them, and die of them).
pub fn hold() -> nix::Result<()> {
    let mut set = SigSet::empty();
    for s in HELD {
        set.add(s);
    }
    set.thread_block()?;
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    let _ = PENDING.set(fd);
    Ok(())
}

/// `Err(Interrupted)` if a held signal came since [`hold`]; `Ok` if none did, or nothing is
/// held (the library used by a program of its own, the tests).
pub(super) fn check() -> Result<(), CertError> {
    let Some(fd) = PENDING.get() else {
        return Ok(());
    };
    match fd.read_signal() {
        Ok(Some(info)) => {
            let name = i32::try_from(info.ssi_signo)
                .ok()
                .and_then(|n| Signal::try_from(n).ok())
                .map_or("a signal", Signal::as_str);
            Err(CertError::Interrupted(name))
        }
        _ => Ok(()),
    }
}
